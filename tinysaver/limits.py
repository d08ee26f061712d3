"""Input limits shared by every path that decodes images (infer, profile, serve); no imports, so
the command line can offer them as defaults without loading torch."""

# 40 megapixels: above every common camera's default output (12-24 MP phones, 24-36 MP DSLRs; 48 MP
# phone sensors save 12 MP unless asked), and under a quarter of PIL's own bomb limit (179 MP). Decoded
# as RGB it is 120 MB, and resizing it to a model's input took 0.86 s on one core of the 2-core
# development VM (busy beside a test run; 0.08 s at 4 MP), per model: a shared service should not
# spend more than that on one request.
MAX_PIXELS = 40_000_000

# decoded pixels one process holds at once, across the images of a block or of every request in a
# replica: 80 megapixels (240 MB as RGB), so many legal images cannot add up to an out-of-memory
# kill (40 PNGs of 6000 × 6000 pixels were 4.3 GB). A --max-pixels above it raises it to one image.
MAX_PIXELS_IN_FLIGHT = 2 * MAX_PIXELS

# a file this large is refused from its size, before a byte is read: 256 MiB is twice a 40 MP image
# stored uncompressed as 16-bit RGB, the largest form an image under MAX_PIXELS takes on disk
MAX_FILE_BYTES = 256 * 2**20


__all__ = ["MAX_PIXELS", "MAX_PIXELS_IN_FLIGHT", "MAX_FILE_BYTES"]
