"""The CLIP encoder against direct open_clip calls, captions by tokens, and weight errors."""

from __future__ import annotations

import os
import subprocess
import sys

import open_clip
import pytest
import torch

from detector_core.demo import make_image
from detector_core.method.features import ClipEncoder, WeightsNotFoundError, build_preprocess, feature_dim


def _direct_model(seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.create_model("test-tiny", pretrained=None).eval()


def test_test_tiny_is_registered_and_deterministic(tiny_encoder):
    assert "test-tiny" in open_clip.list_models()
    again = ClipEncoder("test-tiny", "none")
    for a, b in zip(tiny_encoder.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)


def test_image_and_text_features_equal_direct_open_clip(tiny_encoder):
    import numpy as np

    rng = np.random.default_rng(0)
    images = [make_image(rng) for _ in range(3)]
    pixels = torch.stack([tiny_encoder.preprocess(im) for im in images])
    captions = ["a cat on a mat", "an astronaut riding a horse", "x"]
    feats = tiny_encoder.encode(pixels, captions, "image+text")
    direct = _direct_model()
    tok = open_clip.get_tokenizer("test-tiny")
    with torch.no_grad():
        expected = torch.cat([direct.encode_image(pixels), direct.encode_text(tok(captions))], dim=1)
    assert feats.shape == (3, feature_dim("test-tiny", "image+text")) == (3, 128)
    torch.testing.assert_close(feats, expected)
    # Not L2-normalised (the reference does not normalise).
    assert not torch.allclose(feats[:, :64].norm(dim=1), torch.ones(3))
    torch.testing.assert_close(tiny_encoder.encode(pixels, None, "image"), expected[:, :64])


def test_captions_are_cut_at_77_tokens_not_characters(tiny_encoder):
    words = " ".join(f"word{i}" for i in range(200))
    longer = words + " and many more words that fall past the context"
    a, b = tiny_encoder.encode_texts([words, longer])
    torch.testing.assert_close(a, b)  # both cut at 77 tokens
    short_a, short_b = tiny_encoder.encode_texts(["x" * 100 + " red", "x" * 100 + " blue"])
    assert not torch.allclose(short_a, short_b)  # 100 characters are far fewer than 77 tokens
    assert tiny_encoder.tokenizer([words]).shape == (1, 77)


def test_image_text_mode_refuses_missing_captions(tiny_encoder):
    pixels = torch.zeros(2, 3, 64, 64)
    with pytest.raises(ValueError, match="caption"):
        tiny_encoder.encode(pixels, None, "image+text")
    with pytest.raises(ValueError, match="caption"):
        tiny_encoder.encode(pixels, ["a", None], "image+text")


def test_standalone_preprocess_matches_model_preprocess(tiny_encoder):
    import numpy as np

    im = make_image(np.random.default_rng(1), size=(150, 97))
    torch.testing.assert_close(build_preprocess("test-tiny", "none")(im), tiny_encoder.preprocess(im))


def test_missing_weight_file_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="--pretrained"):
        ClipEncoder("test-tiny", str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="unknown CLIP model"):
        ClipEncoder("no-such-model", "none")


def test_tag_without_network_fails_fast_with_advice():
    code = (
        "from detector_core.method.features import ClipEncoder, WeightsNotFoundError\n"
        "try:\n ClipEncoder('ViT-B-32', 'openai')\n"
        "except WeightsNotFoundError as e:\n print('CLEAR', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "CLEAR" in out.stdout and "--pretrained" in out.stdout, out.stdout + out.stderr


def test_local_and_s3_checkpoints_load(tmp_path, s3_bucket, s3_server):
    import s3fs

    source = ClipEncoder("test-tiny", "none", seed=123)
    path = tmp_path / "tiny.pt"
    torch.save(source.model.state_dict(), path)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.put(str(path), f"{s3_bucket[5:]}/weights/tiny.pt")
    for pretrained in (str(path), f"{s3_bucket}/weights/tiny.pt"):
        loaded = ClipEncoder("test-tiny", pretrained, cache_dir=str(tmp_path / "cache"), seed=0)
        for a, b in zip(source.model.state_dict().values(), loaded.model.state_dict().values()):
            assert torch.equal(a, b)
    with pytest.raises(WeightsNotFoundError, match="not found"):
        ClipEncoder("test-tiny", f"{s3_bucket}/weights/nope.pt", cache_dir=str(tmp_path / "cache"))


def test_a_model_whose_weights_load_next_draws_no_random_init_and_refuses_an_unset_weight(tmp_path, monkeypatch):
    """From a checkpoint, the model is built without its random initialisation (the draws fill NaN instead), every weight
    is the checkpoint's, and a weight the checkpoint leaves unset is refused, not left random."""
    from detector_core.method import features

    with features._WeightsLoadedNext():
        bare = features._open_clip().create_model("test-tiny")  # with the package's test-tiny registered
    unset = [k for k, v in bare.state_dict().items() if v.is_floating_point() and torch.isnan(v).all()]
    assert len(unset) > 20 and "visual.transformer.resblocks.0.attn.in_proj_weight" in unset  # drawn by no initialiser
    assert torch.isfinite(bare.attn_mask.nan_to_num(neginf=0)).all() and bare.attn_mask[0, 1] == float("-inf")  # computed, not drawn
    assert not any(torch.isnan(v).any() for v in features._open_clip().create_model("test-tiny").state_dict().values())  # the mode ended

    source = ClipEncoder("test-tiny", "none", seed=7)
    path = tmp_path / "tiny.pt"
    torch.save(source.model.state_dict(), path)
    entered = []

    class Spy(features._WeightsLoadedNext):
        def __enter__(self):
            entered.append(True)
            return super().__enter__()

    monkeypatch.setattr(features, "_WeightsLoadedNext", Spy)
    ClipEncoder("test-tiny", "none")
    assert entered == []  # random weights are drawn, as before
    loaded = ClipEncoder("test-tiny", str(path), seed=0)
    assert entered == [True]
    assert all(torch.equal(a, b) for a, b in zip(source.model.state_dict().values(), loaded.model.state_dict().values()))

    bare.load_state_dict({k: v for k, v in source.model.state_dict().items() if k != "text_projection"}, strict=False)
    with pytest.raises(WeightsNotFoundError, match=r"1 tensors unset \(text_projection\)"):
        features._check_loaded(bare, "test-tiny")


def test_bf16_weights_stay_close_to_fp32_and_a_static_batch_pads_without_changing_rows():
    """The faster forwards (features.FORWARDS): bf16 weights differ from fp32 by bf16's rounding only, and a compiled
    tower's static batch (padding short batches, splitting long ones) gives each row what an unpadded call gives."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, 64, 64)
    ref = ClipEncoder("test-tiny", "none", precision="fp32").encode_images(x)
    bf16 = ClipEncoder("test-tiny", "none", precision="bf16-weights")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    got = bf16.encode_images(x)
    assert got.dtype == torch.float32
    rel = (got - ref).norm(dim=1) / ref.norm(dim=1)
    assert 0 < rel.max() < 0.05, rel  # rounded, not equal, not far
    padded = ClipEncoder("test-tiny", "none", precision="fp32")
    padded.static_batch = 4  # what compile_mode sets; the padding logic without a compile on CPU
    torch.testing.assert_close(padded.encode_images(x), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded.encode_images(x[:1]), ref[:1], rtol=1e-5, atol=1e-5)
