"""Built-in passes. Importing this package registers them (see `onnx_normfix.registry`)."""

from . import fix_inorm, fold_bn, fuse_norms, replace_random  # noqa: F401  (imported to register)
