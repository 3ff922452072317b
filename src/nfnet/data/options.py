"""The names the datamodule accepts, in a module light enough for the command line's checks."""

SOURCES = ("shapes", "imagenet", "imagefolder", "streaming")
# What pack.py packs (nfnet.data.packing).
PACK_SOURCES = ("imagefolder", "imagenet")
AUGMENTS = ("official", "basic", "none")
