"""Look at a fit in the browser: a Deep Zoom server that renders every tile from the field.

    python view.py --ckpt last.ckpt [--source image] [--port 8000] [--host 127.0.0.1]

prints one URL. The page (viewer/, OpenSeadragon from npm) shows the fit from the whole image
down to ZOOM times past the source resolution (the field is continuous: new pixels, not
enlarged ones), the source beside it in step, the visible region's PSNR and the per-pixel
error. Any Deep Zoom viewer can open the pyramids (tileserver.py says which). When the checkpoint
file changes it is reloaded and the page refreshes its tiles. train.py --serve (live.py) serves
the same during training.
"""
import ipaddress
import os
import signal
import sys
import threading

import cli
import images
from field import CheckpointError, load_field
from hardware import DEVICE_HELP, resolve_device
from tileserver import OSD_DIR, OSD_MISSING, ZOOM, Scene, start_server

RELOAD_POLL = 1.0                  # seconds between looks at the checkpoint file


def exposure_warning(host):
    """A line saying who else can see the images when `host` is not this machine's loopback."""
    try:
        private = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        private = False
    if private:
        return None
    return (f"view.py: warning: --host {host!r} serves the source image and the fit, without a "
            "password, to every machine that can reach this one; the default 127.0.0.1 with an "
            "SSH port forward keeps them to you")


def find_source(path, info):
    """The source image for a checkpoint: `path` when given, else the file name the checkpoint
    recorded when it is in the current folder (else None). (H, W, C) uint8; ValueError /
    ImageError when it cannot be used."""
    if path is None:
        path = info["source"]
        if not path or not os.path.isfile(path):
            return None
    source = images.to_srgb8(images.read_image(path))
    if source.shape != (info["height"], info["width"], info["channels"]):
        raise ValueError(f"{path}: the source is {source.shape[1]}x{source.shape[0]}x"
                         f"{source.shape[2]}, the checkpoint was trained on "
                         f"{info['width']}x{info['height']}x{info['channels']}")
    return source


def say(line):
    """Print `line` to stdout; once nobody reads it (`view.py ... | head -1`), quietly drop it
    and everything after (Python's own advice: stdout to devnull, no BrokenPipeError)."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def watch(path, scene, device, stop):
    """Reload the checkpoint whenever the file changes (train.py renames a complete file into
    place); a file that does not load, or fits another image, keeps the current field."""
    def stamp():
        try:
            st = os.stat(path)
            return st.st_mtime_ns, st.st_size, st.st_ino
        except OSError:
            return None
    seen = stamp()
    while not stop.wait(RELOAD_POLL):
        now = stamp()
        if now is None or now == seen:
            continue
        seen = now
        try:
            field, info = load_field(path, device)
            if (info["width"], info["height"], info["channels"]) != \
                    (scene.width, scene.height, scene.channels):
                raise CheckpointError(f"{path}: now fits another image size")
        except (CheckpointError, OSError) as error:
            say(f"view.py: kept step {scene.step}: {cli.one_line(error)}")
            continue
        scene.update(field, info["global_step"])
        say(f"view.py: reloaded {path} (step {info['global_step']})")


def build_parser():
    parser = cli.ArgumentParser(
        prog="view.py", description="Serve a fit as a zoomable image in the browser (Deep "
        "Zoom tiles rendered from the field on demand), reloading it when the checkpoint "
        "changes.")
    parser.add_argument("--ckpt", required=True, help="checkpoint written by train.py")
    parser.add_argument("--source", help="the image it was trained on, shown beside it "
                        "[default: the checkpoint's recorded file name, if it is here]")
    parser.add_argument("--port", type=cli.integer(0, 65535), default=8000,
                        help="port; 0 picks a free one [default: %(default)s]")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on; "
                        "127.0.0.1 is only this machine (use an SSH port forward from "
                        "elsewhere); ::1 the same in IPv6; 0.0.0.0 or :: every address, open to "
                        "the network [default: %(default)s]")
    parser.add_argument("--zoom", type=cli.integer(0, 6), default=ZOOM.bit_length() - 1,
                        metavar="K", help="levels past the source resolution: the fit's "
                        "finest level is 2**K times the source [default: %(default)s]")
    parser.add_argument("--device", default="auto", help=f"{DEVICE_HELP} [default: %(default)s]")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
        field, info = load_field(args.ckpt, device)
        source = find_source(args.source, info)
        scene = Scene(field, info, source, zoom=2 ** args.zoom)
        server, url = start_server(scene, args.host, args.port)
    except (CheckpointError, images.ImageError, ValueError, OSError) as error:
        parser.error(error)
    except KeyboardInterrupt:        # Ctrl-C while loading
        parser.exit(130, "view.py: interrupted\n")
    stop = threading.Event()
    # Ctrl-C or SIGTERM: stop listening, finish, exit 0
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    workers = [threading.Thread(target=scene.queue.work, args=(stop,), name="view-render"),
               threading.Thread(target=watch, args=(args.ckpt, scene, device, stop),
                                name="view-reload")]
    for thread in workers:
        thread.start()
    # the URL first (`view.py ... | head -1`), then what the user should know
    say(f"view.py: serving {args.ckpt} (step {info['global_step']}"
        + (", with its source" if source is not None else ", no source") + f") at {url}")
    for note in (exposure_warning(args.host),
                 None if os.path.isdir(OSD_DIR) else f"view.py: {OSD_MISSING}"):
        if note:
            say(note)
    while not stop.wait(0.5):
        pass
    server.close()
    for thread in workers:      # torch's threads must not be torn down under a render
        thread.join()
    say("view.py: stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
