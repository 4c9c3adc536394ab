"""Triton's interpreter under numpy >= 2.4, for the ``*_sim.py`` scripts: numpy refuses int() of a
1-element array, which the interpreter's scalars are, so ``tl.tensor.__index__`` is set each time
the interpreter patches the language (one place for every script that needs it)."""
import triton.language as tl
import triton.runtime.interpreter as interp


def patch_scalar_index() -> None:
    """Make the interpreter's scalar tensors usable as indices (idempotent)."""
    if getattr(interp._patch_lang, "_tpcomm_index", False):
        return
    orig = interp._patch_lang

    def patch(fn):
        r = orig(fn)
        tl.tensor.__index__ = lambda self: int(self.handle.data.reshape(-1)[0])
        return r

    patch._tpcomm_index = True
    interp._patch_lang = patch
