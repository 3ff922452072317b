"""The names the datamodule accepts, in a module light enough for the command line's checks."""

SOURCES = ("shapes", "imagenet", "imagefolder")
AUGMENTS = ("official", "basic", "none")
