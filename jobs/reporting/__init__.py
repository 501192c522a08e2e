"""The review page's parts (``python -m jobs.report`` is the command): its config, thumbnails and the page itself."""
