"""What every job shares: the config machinery (``flags``, ``options``), failures (``errors``), Ray start-up (``ray_setup``) and outputs (``outputs``)."""
