"""Why a sample was dropped. One exception type carries a reason code, so the pipeline can count drops by
reason (default) or raise them with the file name (strict mode) from one place."""

from __future__ import annotations

# Reason codes, as counted in `iterator.skipped`.
EMPTY_IMAGE = "empty_image"  # zero-byte file or blob
CORRUPT_IMAGE = "corrupt_image"  # not a decodable image
TRUNCATED_IMAGE = "truncated_image"  # header fine, pixel data cut short
DECOMPRESSION_BOMB = "decompression_bomb"  # declared size above the pixel limit; never decoded
MISSING_FILE = "missing_file"
UNREADABLE_FILE = "unreadable_file"  # exists but cannot be read (permissions, a directory, a device, ...)
FILE_TOO_LARGE = "file_too_large"  # above the byte limit; never read
OUTSIDE_IMAGE_DIR = "outside_image_dir"  # an image path leading out of the image folder; never opened
INVALID_ENTRY = "invalid_entry"  # a manifest line that is not a JSON object
PARTIAL_BATCH = "partial_batch"  # good rows at the end of a finite input, too few for a whole batch
EMPTY_TEXT = "empty_text"
TEXT_TOO_LONG = "text_too_long"  # not even the first turn fits the fixed length
UNKNOWN_TASK = "unknown_task"
BAD_ANNOTATION = "bad_annotation"  # missing/ill-typed fields, malformed conversation or box
IMAGE_COUNT_MISMATCH = "image_count_mismatch"  # <image> placeholders != images
TOO_MANY_IMAGES = "too_many_images"  # more images than the batch has slots
IMAGE_TOKEN_IN_TEXT = "image_token_in_text"  # the text itself tokenises to the image placeholder id
UNEXPECTED_ERROR = "unexpected_error"  # any other exception while preparing one sample


class BadSample(Exception):
    """One sample cannot be used. `reason` is one of the codes above, `detail` says what was seen."""

    def __init__(self, reason: str, detail: str = "", source: str = ""):
        self.reason, self.detail, self.source = reason, detail, source
        super().__init__(f"{source + ': ' if source else ''}{reason}{': ' + detail if detail else ''}")


class BadSampleError(RuntimeError):
    """Raised by strict pipelines: names the sample (id and file) and the reason."""
