"""Deployment exports. The packed weight file is `adaround.save`/`adaround.load` (adaround.io);
its bit packing is `adaround.export.bitpack`."""
