"""A Ling-2.6 model in the shape of the remote code a checkpoint ships (``trust_remote_code``),
written by this project for the ``hf_remote`` backend's tests; the authors' file is not copied."""
