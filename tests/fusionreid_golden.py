"""FusionReID's golden cases (tests/golden/fusionreid/, recorded from the released code):
the folder, reading one case file, and capturing sub-module outputs to compare with it."""
import os

import torch

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "fusionreid")


def load_golden(filename):
    """The case file `filename` of the golden folder (tensors and plain values only)."""
    return torch.load(os.path.join(GOLDEN, filename), weights_only=True)


def capture(module, names):
    """Forward hooks storing the output of the sub-modules `names` (first tensor of a tuple);
    returns the dict they fill, name -> detached copy."""
    seen = {}
    modules = dict(module.named_modules())
    for name in names:
        def hook(_, __, out, name=name):
            seen[name] = (out[0] if isinstance(out, tuple) else out).detach().clone()
        modules[name].register_forward_hook(hook)
    return seen
