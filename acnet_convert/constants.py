"""Torch-free tables shared by the library and the command line: modes, inits, kinds, formats, defaults.

The command line reads them without importing torch; the library checks its arguments against them.
"""

BLOCK_MODES = ("exact", "fast")  # "exact": the paper's block, a BatchNorm on every branch; "fast": one conv per forward
MODES = (*BLOCK_MODES, "repopt")  # "repopt": the plain conv, its gradient preconditioned as a CSLA block's
REPOPT_KINDS = ("acb", "dbb", "repvgg")  # the kinds with a gradient preconditioner (DBB without its 1x1-KxK branch)
DEFAULT_REPOPT_SCALE = 1.0  # every CSLA branch's constant scale unless searched: the fast blocks' starting scales
SEARCH_BATCH = 32  # the batch size of `acnet convert --search-scales`
INITS = ("preserve", "scratch")  # new branches start at zero (same function) or at gamma_init (as in the paper)
LAYOUTS = ("lines", "planes")  # ACB's branches of a 3D kernel: centre lines or centre planes
DEFAULT_KIND = "acb"
DEFAULT_GAMMA = 1 / 3  # the new branches' initial gamma with init="scratch" (chosen by docs/accuracy.md)
DEFAULT_MIN_KERNEL = 3

# The built-in block kinds, in the order they are listed: kind -> {mode: "module:Class"} under acnet_convert.blocks.
BUILTIN_KINDS = {
    "acb": {"exact": "acb:ACBlock", "fast": "acb:FastACBlock"},
    "dbb": {"exact": "dbb:DBBlock", "fast": "dbb:FastDBBlock"},
    "repvgg": {"exact": "repvgg:RepVGGBlock", "fast": "repvgg:FastRepVGGBlock"},
    "qarepvgg": {"exact": "qarepvgg:QARepVGGBlock"},
    "mobileone": {"exact": "mobileone:MobileOneBlock", "fast": "mobileone:FastMobileOneBlock"},
    "dilated": {"exact": "dilated:DilatedBlock", "fast": "dilated:FastDilatedBlock"},
}
# "acb-exact", "acb-fast", ...: every built-in kind in each of its modes
BUILTIN_VARIANTS = tuple(f"{kind}-{mode}" for kind, modes in BUILTIN_KINDS.items() for mode in modes)

FILE_FORMATS = ("acified", "plain", "original")  # what a checkpoint file holds (its "acnet.format" entry)
ARTIFACT_FORMATS = ("onnx", "pt2", "torchscript")  # what `acnet export` writes
DEVICES = ("cpu", "cuda")
DEMO_EPOCHS = 30
