"""Pictures in, tensors out: the one image reader and the one centre crop of the project.

Every command reads images the same way (`read_image`: any file PIL opens, in any mode, as 8-bit
RGB, or a one-line error) and crops them the same way (`center_crop`: the short side resized to cover
the target, then the centre cut out, LAVIS' and torchvision's Resize + CenterCrop).
"""

import os

import numpy as np
from PIL import Image

# The files taken as images when a folder is given (sample.py, train.py, pairs.py).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ImageError(ValueError):
    """A file that is not a readable image; the message is one line that names it."""


def image_files(folder):
    """The images in `folder` (not its subfolders), as paths sorted by name."""
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))


def to_rgb(image):
    """Any PIL image -> 8-bit RGB. Palette, grayscale, CMYK and RGBA images convert as PIL does
    (alpha dropped, as the reference's `convert("RGB")`); 16- and 32-bit images are rescaled to
    8 bits first, which PIL's own conversion would clip."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or a.max() > 255 else 255.0
        image = Image.fromarray(np.clip(np.round(a / peak * 255.0), 0, 255).astype(np.uint8))
    return image if image.mode == "RGB" else image.convert("RGB")


def read_image(source, mode="RGB"):
    """A path (or a PIL image) -> a PIL image in `mode`, loaded into memory: RGB by `to_rgb`, other
    modes ("L" for a mask) by PIL's conversion. Raises ImageError for a file that cannot be read,
    including one too large to be a picture (PIL's decompression-bomb limit, about 179 megapixels)."""
    if isinstance(source, Image.Image):
        return to_rgb(source) if mode == "RGB" else source.convert(mode)
    try:
        with Image.open(source) as im:
            im.load()
            return to_rgb(im) if mode == "RGB" else im.convert(mode)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{source}: not an image that can be read ({type(e).__name__}); "
                         f"give a PNG, JPEG or WebP") from None


def center_crop(image, height, width, resample=Image.BICUBIC):
    """Resize (bicubic) so the image covers height x width with its aspect ratio kept, then cut out
    the centre: what LAVIS' Resize(short side) + CenterCrop does, for any target shape."""
    scale = max(height / image.height, width / image.width)
    image = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))), resample)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))
