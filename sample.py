"""Zero-shot subject-driven generation from the command line (BLIP-Diffusion, §3.2).

    python sample.py --subject examples/red-dotted-ball.png --subject-text ball --prompt "in the snow"
    python sample.py --weights weights/blipdiffusion --subject dog.png --subject-text dog \\
        --prompt "swimming underwater" --out out.png

Without --weights the shipped toy model (weights/toy, trained by toymodel.py) is used. Defaults
reproduce diffusers' BlipDiffusionPipeline: 50 PNDM steps, guidance 7.5 (or the scale the model's
model_index.json names: 5 for the toy), the model's own resolution (512x512 for the published model,
64x64 for the toy), an empty negative prompt, the prompt repeated 20 times. Everything is checked before the weights are
read, so bad input costs a second, prints one line and writes nothing.
"""

import math
import os
import sys
import time
import warnings

import numpy as np
from PIL import Image

from checkpoint import write_atomically
from cli import Parser, add_threads, check_writable, pick_device, real, use_threads, whole
from controlnet import CANNY_HIGH, CANNY_LOW, Control
from data import IMAGE_EXTENSIONS, ImageError, image_files, read_image

OUTPUT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".npy")


class InputError(ValueError):
    """Bad input from the command line: printed as one line, exit status 2."""


def read_images(path):
    """An image file, or every image in a folder (sorted by name) -> a list of PIL images."""
    if os.path.isdir(path):
        files = image_files(path)
        if not files:
            raise InputError(f"{path}: the folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise InputError(f"{path}: no such file or folder")
    try:
        return [read_image(f) for f in files]
    except ImageError as e:
        raise InputError(str(e)) from None


def check_output(path):
    """The output must have a known extension and an existing folder this process can write in,
    checked (by making a file there) before any work."""
    if not path.lower().endswith(OUTPUT_EXTENSIONS):
        raise InputError(f"--out {path}: use one of {', '.join(OUTPUT_EXTENSIONS)}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"--out {path}: there is no folder {folder}; create it or choose another place")
    try:
        check_writable(path)
    except ValueError as e:
        raise InputError(str(e)) from None


def check_weights(folder):
    """A training run's folder without a whole model is said as such: a stage that makes parts (0, 1),
    or a run stopped before its export, with the way to finish it; what else can be wrong with a
    weights folder, the loader says."""
    if os.path.isfile(os.path.join(folder, "model_index.json")) or not os.path.isdir(os.path.join(folder, "checkpoints")):
        return
    parts = [p for p in ("qformer", "unet", "vae", "text_encoder") if os.path.isdir(os.path.join(folder, p))]
    if parts:
        raise InputError(f"--weights {folder}: the output of a training stage that makes parts of the model "
                         f"({', '.join(parts)}), not a whole one; train.py --stage subject makes one from them")
    steps = sorted(n for n in os.listdir(os.path.join(folder, "checkpoints")) if n.startswith("step-"))
    raise InputError(f"--weights {folder}: a training run without an exported model"
                     + (f" (checkpoints up to {steps[-1]})" if steps else "") + "; finish it with the command that "
                     f"started it plus --resume (train.py ... --out {folder} --resume), which exports the model")


def grid(images):
    """N images in a near-square grid, row by row."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    sheet = Image.new("RGB", (cols * w, rows * h))
    for k, im in enumerate(images):
        sheet.paste(im, ((k % cols) * w, (k // cols) * h))
    return sheet


def write_outputs(path, array):
    """.npy: the float32 (N, H, W, 3) array in [0, 1]. An image: the picture (a grid when N > 1,
    with each image beside it as NAME-k.EXT). Returns the paths written."""
    if path.lower().endswith(".npy"):
        write_atomically(path, lambda tmp: np.save(tmp, array.astype(np.float32)))
        return [path]
    images = [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]
    written = []
    if len(images) > 1:
        stem, ext = os.path.splitext(path)
        for k, im in enumerate(images):
            write_atomically(f"{stem}-{k}{ext}", im.save)
            written.append(f"{stem}-{k}{ext}")
    write_atomically(path, (grid(images) if len(images) > 1 else images[0]).save)
    return [path] + written


def check_control(args):
    """The structure controls asked for -> [(kind, control image, ControlNet folder, scale)], read and
    checked before any work. --control, --control-image, --controlnet and --control-scale are matched by
    order; a missing --controlnet is WEIGHTS/controlnet, one --control-scale applies to all."""
    kinds, images, folders, scales = args.control, args.control_image, args.controlnet, args.control_scale
    if not kinds:
        for flag, given in (("--control-image", images), ("--controlnet", folders), ("--control-scale", scales)):
            if given:
                raise InputError(f"{flag} needs --control canny (edges of a photo) or --control image (a map)")
        return []
    n = len(kinds)
    if not images:
        raise InputError(f"--control {kinds[0]} needs --control-image PATH")
    if len(images) != n:
        raise InputError(f"{n} --control but {len(images)} --control-image: give one image per --control, in order")
    if len(folders) > n:
        raise InputError(f"{n} --control but {len(folders)} --controlnet: give at most one ControlNet per --control")
    if len(scales) not in (0, 1, n):
        raise InputError(f"{n} --control but {len(scales)} --control-scale: give one scale for all, or one each")
    folders = folders + [os.path.join(args.weights, "controlnet")] * (n - len(folders))
    scales = [1.0] * n if not scales else scales * n if len(scales) == 1 else scales
    for folder in folders:
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise InputError(f"{folder}: no ControlNet there; give --controlnet DIR (e.g. "
                             f"weights/sd-controlnet-canny, see weights/README.md)")
    return [(kind, read_images(image)[0], folder, scale) for kind, image, folder, scale in zip(kinds, images, folders, scales)]


def control_map(args, kind, image):
    """--control image: the map as it is; canny: the edges of the photo at the size generated (known
    once the model is read), so the structure lands where it is in the photo."""
    if kind == "image":
        return image
    from controlnet import canny_control_image
    return canny_control_image(image.resize((args.width, args.height), Image.BICUBIC), args.canny_low, args.canny_high)


def check_edit(args, subjects):
    """The real image to edit for --edit (or None); the editing flags must make sense together."""
    if args.edit and not args.edit_word:
        raise InputError("--edit IMAGE needs --edit-word WORD (the word for what is to be replaced)")
    if not args.edit_word:
        return None
    if len(subjects) > 1 or args.num_images != 1 or args.control:
        raise InputError("editing takes one subject and one image, without --control")
    return read_images(args.edit)[0] if args.edit else None


def main(argv=None):
    p = Parser(prog="sample.py", description="Render a subject in a new context (BLIP-Diffusion, zero-shot).")
    toy = os.path.relpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "toy"))
    p.add_argument("--weights", default=toy,
                   help="published-layout folder: the shipped toy model, or e.g. weights/blipdiffusion (weights/README.md)")
    p.add_argument("--subject", action="append", default=[], metavar="PATH",
                   help="an image or a folder of images of one subject; repeat for several subjects "
                        "(not needed with a model fine-tuned by train.py --stage finetune)")
    p.add_argument("--subject-text", action="append", default=[], metavar="WORD",
                   help="the subject's category word (e.g. dog), one per --subject")
    p.add_argument("--subject-weight", action="append", type=real(low=0), default=[], metavar="W",
                   help="mixing weight per --subject (subject interpolation); default equal")
    p.add_argument("--target-text", default=None, metavar="WORD", help="word written into the prompt; default the first subject text")
    p.add_argument("--prompt", required=True, help='the new context, e.g. "swimming underwater"')
    p.add_argument("--negative-prompt", default="", help="what to steer away from (default empty, as diffusers)")
    p.add_argument("--steps", type=whole(1), default=50, help="denoising steps (PNDM: steps + 1 UNet calls)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale; <= 1 turns it off (default: the model's, 7.5 published, "
                        "5 the toy)")
    p.add_argument("--seed", type=whole(0), default=0, help="image k of a batch uses seed + k")
    p.add_argument("--height", type=whole(8), default=None,
                   help="pixels, a multiple of 8 (default: the model's, 512 published)")
    p.add_argument("--width", type=whole(8), default=None, help="pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--scheduler", choices=("pndm", "ddim", "dpm"), default="pndm",
                   help="pndm: the published scheduler; ddim: Stable Diffusion v1.5's DDIM; dpm: DPM-Solver++(2M), "
                        "as good at 25 steps on the toy evaluation (docs/usage.md)")
    p.add_argument("--num-images", type=whole(1), default=1, help="images per prompt")
    p.add_argument("--center-crop", action="store_true",
                   help="LAVIS-style subject preprocessing (short side resize + centre crop) instead of diffusers' squash")
    g = p.add_argument_group("structure control (ControlNet, paper §3.3); repeat the four flags for several "
                             "ControlNets at once, matched by order, their residuals summed")
    g.add_argument("--control", choices=("canny", "image"), action="append", default=[],
                   help="canny: edges of --control-image steer the layout; image: --control-image is the map itself")
    g.add_argument("--control-image", action="append", default=[], metavar="PATH",
                   help="the photo (canny) or the control map (image), one per --control")
    g.add_argument("--control-scale", type=real(low=0), action="append", default=[],
                   help="ControlNet residual scale (default 1.0; 0 turns it off): one for all, or one per --control")
    g.add_argument("--controlnet", action="append", default=[], metavar="DIR",
                   help="ControlNet folder (e.g. lllyasviel/sd-controlnet-canny), one per --control; "
                        "default WEIGHTS/controlnet")
    g.add_argument("--canny-low", type=real(low=0), default=CANNY_LOW, help="Canny's low threshold (0-255 gradient scale)")
    g.add_argument("--canny-high", type=real(low=0), default=CANNY_HIGH, help="Canny's high threshold")
    g = p.add_argument_group("subject-driven editing (prompt-to-prompt, paper §3.3)")
    g.add_argument("--edit", default=None, metavar="IMAGE", help="a real image to edit; without it the source is generated")
    g.add_argument("--edit-word", default=None, metavar="WORD",
                   help='the word to replace: the source is "a {WORD} {prompt}", the edit puts the subject there')
    g.add_argument("--edit-threshold", type=real(low=0, high=1), default=0.3,
                   help="edit-mask threshold on the source word's attention (LAVIS 0.3; lower edits more)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                   help="auto: CUDA if there is one, then MPS, else the CPU")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None, help="default fp32 on CPU, fp16 on CUDA")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet: the first call compiles (about a minute on a 2-core CPU), later "
                        "steps run faster; pays off over long runs (docs/usage.md#speed)")
    p.add_argument("--out", default="out.png", help=".png/.jpg image (a grid when N > 1) or .npy float32 (N, H, W, 3)")
    add_threads(p)
    args = p.parse_args(argv)
    try:
        return generate(args)
    except KeyboardInterrupt:
        print(f"\ninterrupted: nothing written to {args.out}", file=sys.stderr)
        return 130


def generate(args):
    # Everything that can be wrong with the input is checked before the weights are read.
    try:
        for flag, size in (("--height", args.height), ("--width", args.width)):
            if size is not None and size % 8:
                raise InputError(f"{flag} {size}: use a multiple of 8 (e.g. {size // 8 * 8 or 8} or {size // 8 * 8 + 8})")
        if args.canny_low > args.canny_high:
            raise InputError(f"--canny-low {args.canny_low} is above --canny-high {args.canny_high}")
        check_weights(args.weights)
        if not args.subject and not os.path.isfile(os.path.join(args.weights, "ctx_embeddings.safetensors")):
            raise InputError("give --subject PATH (an image or a folder of images) and --subject-text WORD; "
                             f"{args.weights} is not a fine-tuned model that carries its subject")
        if len(args.subject_text) != len(args.subject):
            raise InputError(f"{len(args.subject)} --subject but {len(args.subject_text)} --subject-text: give one word per subject")
        if args.subject_weight and len(args.subject_weight) != len(args.subject):
            raise InputError(f"{len(args.subject)} --subject but {len(args.subject_weight)} --subject-weight: give one per subject")
        check_output(args.out)
        subjects = [read_images(path) for path in args.subject]
        controls = check_control(args)
        edit_image = check_edit(args, subjects)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from blipdiff import DTYPES, BlipDiffusion, Sampling, keep_freed_memory
    from checkpoint import CheckpointError

    try:
        device = pick_device(args.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    use_threads(args.threads)
    keep_freed_memory()
    dtype = DTYPES[args.dtype or ("fp16" if device == "cuda" else "fp32")]
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"
    start = time.time()
    try:
        model = BlipDiffusion.from_pretrained(args.weights).to(device, dtype)
        nets = {}  # each folder read once, however many --control use it
        for _, _, folder, _ in controls:
            if folder not in nets:
                from controlnet import ControlNet
                nets[folder] = ControlNet.from_pretrained(folder).to(device, dtype)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.compile:
        model.compile_unet()
    args.height, args.width = args.height or model.resolution, args.width or model.resolution
    control = [Control(nets[folder], control_map(args, kind, image), scale) for kind, image, folder, scale in controls]
    sampling = Sampling(steps=args.steps, guidance=args.guidance, seed=args.seed, height=args.height, width=args.width,
                        scheduler=args.scheduler, num_images=args.num_images, negative_prompt=args.negative_prompt)
    if args.edit_word:
        import editing
        subject = dict(subject_images=subjects[0] if subjects else None,
                       subject_text=args.subject_text[0] if subjects else None)
        target = args.target_text or (args.subject_text[0] if subjects else model.subject_text)
        edit = editing.Edit(threshold=args.edit_threshold)
        if edit_image is not None:
            source, edited = editing.edit_real(model, edit_image, args.prompt, args.edit_word, target, **subject,
                                               sampling=sampling, edit=edit, output="np")
        else:
            source, edited = editing.edit_generated(model, args.prompt, args.edit_word, target, **subject,
                                                    sampling=sampling, edit=edit, output="np")
        stem, ext = os.path.splitext(args.out)
        written = write_outputs(args.out, edited[None]) + write_outputs(f"{stem}-source{ext}", source[None])
        print(f"wrote {written[0]} (the edit) and {written[1]} (the {'reconstruction' if args.edit else 'source'}), "
              f"{args.width}x{args.height}, in {time.time() - start:.1f} s")
        return 0
    array = model.generate(args.prompt, subjects or None, args.subject_text or None, sampling,
                           target_text=args.target_text, subject_weights=args.subject_weight or None,
                           center_crop=args.center_crop, control=control or None, output="np")
    written = write_outputs(args.out, array)
    n = args.num_images
    print(f"wrote {written[0]} ({n} image{'s' * (n > 1)}, {args.width}x{args.height}"
          f"{', and each beside it' if len(written) > 1 else ''}) in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
