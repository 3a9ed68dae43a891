"""A batch's JPEGs decoded by ``torchvision.io.decode_jpeg`` (nvJPEG on a CUDA device, batched)
and resized in torch on that device; every other image goes to the CPU decoder as before.

Only plain baseline or progressive YCbCr JPEGs (Pillow reads them as RGB) with no EXIF rotation,
within ``decode_image``'s pixel and memory limits, are taken: greyscale, CMYK, PNG and anything
the decoder refuses are decoded by the existing CPU path, so their pixels, and every reject with
its reason and message, are the CPU path's. On the CPU the pixels equal the CPU path's (both
use libjpeg-turbo); tests/test_torch_jpeg.py states the tolerance of the GPU's float resize.
"""

from __future__ import annotations

import io
import logging
import warnings

import torch
from PIL import Image, UnidentifiedImageError

from capfilt.images.batch_decoding import Decoded
from capfilt.images.decode import MAX_DECODE_BYTES, MAX_PIXELS, decode_cost
from capfilt.images.transform import ImageTransform
from capfilt.shards.input_rows import SUCCESS

log = logging.getLogger(__name__)
_ORIENTATION = 0x0112


def takes(data: bytes | None) -> tuple[int, int] | None:
    """(width, height) when ``data`` is a JPEG this decoder takes, read from the header alone;
    None sends it to the CPU path."""
    if not data or not data.startswith(b"\xff\xd8"):
        return None
    try:
        with warnings.catch_warnings():  # as decode_image: a bomb warning is a refusal
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format != "JPEG" or image.mode != "RGB":
                return None  # greyscale, CMYK: the CPU path converts them as it always did
            width, height = image.size
            if width * height > MAX_PIXELS or decode_cost("RGB", image.size) > MAX_DECODE_BYTES:
                return None  # the CPU path refuses it, with its reason
            if image.getexif().get(_ORIENTATION, 1) != 1:
                return None
            return width, height
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, UnidentifiedImageError,
            OSError, SyntaxError, ValueError, EOFError):
        return None


class TorchJpegDecoder:
    """``Decoded`` batches as the CPU decoder ``fallback`` makes them, JPEGs decoded and
    resized by torch on ``device``; the pixels stay on ``device`` (a CUDA batch is not copied
    back to the host)."""

    def __init__(self, caption: ImageTransform, filter_: ImageTransform, device: str, fallback):
        self.caption, self.filter = caption, filter_
        self.device = torch.device(device)
        self.fallback = fallback
        # torchvision 0.29 warns on every decode that torchcodec supersedes its decoders.
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities",
                                category=DeprecationWarning)

    def __call__(self, rows: list[dict], pin: bool) -> Decoded:
        sizes = [takes(row["jpg"]) if row["status"] == SUCCESS else None for row in rows]
        fast = [i for i, size in enumerate(sizes) if size is not None]
        images = self._decode([rows[i]["jpg"] for i in fast])
        taken = {i: image for i, image in zip(fast, images) if image is not None}
        rest = [i for i in range(len(rows)) if i not in taken]
        slow = self.fallback([rows[i] for i in rest], pin and self.device.type == "cpu")
        outcomes: list = [None] * len(rows)
        for i, outcome in zip(rest, slow.outcomes):
            outcomes[i] = outcome
        for i in taken:
            outcomes[i] = sizes[i]
        decoded = Decoded(outcomes)
        accepted = [i for i, o in enumerate(outcomes) if isinstance(o, tuple)]
        if not accepted:
            return decoded
        shared = self.filter == self.caption
        slow_index = {i: n for n, i in enumerate(
            i for i, o in zip(rest, slow.outcomes) if isinstance(o, tuple))}
        pixels = []
        for transform, slow_pixels in ((self.caption, slow.caption_pixels),
                                       *(() if shared else ((self.filter, slow.filter_pixels),))):
            batch = torch.empty((len(accepted), 3, transform.height, transform.width),
                                dtype=torch.uint8, device=self.device,
                                pin_memory=pin and self.device.type == "cpu")
            for n, i in enumerate(accepted):
                batch[n] = (transform.resize_pixels(taken[i]) if i in taken
                            else slow_pixels[slow_index[i]])
            pixels.append(batch)
        decoded.caption_pixels, decoded.filter_pixels = pixels[0], pixels[-1]
        return decoded

    def _decode(self, datas: list[bytes]) -> list[torch.Tensor | None]:
        """Decoded (3, H, W) uint8 images on the device, in one batched call; when the batch
        fails, image by image, None for each one the decoder refuses."""
        if not datas:
            return []
        from torchvision.io import ImageReadMode, decode_jpeg  # only workers that use it

        tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in datas]
        try:
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:
            pass
        images = []
        for tensor in tensors:
            try:
                images.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=self.device))
            except RuntimeError as exc:
                log.debug("torchvision refused a JPEG, the CPU path decodes it: %s", exc)
                images.append(None)
        return images

    def close(self) -> None:
        self.fallback.close()
