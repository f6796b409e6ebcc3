"""Downloads by name: the authors' DiT checkpoints, ADM's reference batches, the FID Inception
weights and Fashion-MNIST's four files (`fashion-mnist/<file>.gz`), fetched once into a cache
folder and verified.

- Cache: `$DITLAB_HOME` (default `~/.cache/ditlab`), one file per released name. A file there is
  used as it is (it was verified when it arrived): no request is made.
- `DITLAB_MIRROR=URL` (http, https or file) replaces every download location: a file is looked up
  there by its name (URL/DiT-XL-2-256x256.pt), for clusters without internet.
- `DITLAB_OFFLINE=1` never touches the network; without network a download fails after a
  connection attempt of at most `CONNECT_TIMEOUT_S`. Both say in one line which URL to fetch
  and the exact path to put the file at.
- A download goes to `.NAME.part` beside the target under a lock (fcntl), so two processes
  download once (the second waits and finds the file); an interrupted download is resumed with an
  HTTP Range request, by the same call (a few times, while it makes progress) or by the next run.
  It is verified before it is renamed into place: the byte count the server announced, the
  SHA-256 prefix a name carries (torch hub's convention: torch-fidelity's Inception weights), and
  a structural check (it loads as what it claims to be). A file that fails is removed.
- Under torchrun rank 0 downloads while the other ranks wait at a barrier."""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import os
import shutil
import socket
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse
from urllib.request import url2pathname

from ditlab.data.named import FASHION_FILES, FASHION_URL, hub_name
from ditlab.errors import UserError, one_line

CONNECT_TIMEOUT_S = 1.5  # the reachability probe: a missing network fails within this
READ_TIMEOUT_S = 60.0  # a stalled transfer
RESUME_ATTEMPTS = 3  # one call resumes an interrupted transfer at most this often, and only while it progresses
CHUNK = 1 << 20
DIT_URL = "https://dl.fbaipublicfiles.com/DiT/models/"  # the authors' download.py
ADM_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/"
INCEPTION_NAME = "weights-inception-2015-12-05-6726825d.pth"


@dataclass(frozen=True)
class Released:
    """A file ditlab can fetch by name."""

    url: str
    """its own download location (a mirror replaces everything up to the name)"""
    kind: str
    """"checkpoint", "reference", "inception" or "idx": which structural check it gets"""
    sha256_prefix: str | None = None
    """the leading hex digits of its SHA-256 (all of them where the publisher's file is known)"""
    model: str | None = None
    """the named config it holds (a checkpoint's state dict does not store its heads)"""


RELEASED: dict[str, Released] = {
    "DiT-XL-2-256x256.pt": Released(DIT_URL + "DiT-XL-2-256x256.pt", "checkpoint", model="DiT-XL/2"),
    "DiT-XL-2-512x512.pt": Released(DIT_URL + "DiT-XL-2-512x512.pt", "checkpoint", model="DiT-XL/2"),
    "VIRTUAL_imagenet256_labeled.npz": Released(ADM_URL + "256/VIRTUAL_imagenet256_labeled.npz", "reference"),
    "VIRTUAL_imagenet512.npz": Released(ADM_URL + "512/VIRTUAL_imagenet512.npz", "reference"),
    INCEPTION_NAME: Released("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_NAME,
                             "inception", sha256_prefix="6726825d"),
    **{hub_name(stem): Released(FASHION_URL + f"{stem}.gz", "idx", sha256_prefix=f.gz_sha256)
       for stem, f in FASHION_FILES.items()},  # fashion-mnist/<stem>.gz: a name may hold a folder
}
REFERENCE_BATCHES = {"imagenet256": "VIRTUAL_imagenet256_labeled.npz", "imagenet512": "VIRTUAL_imagenet512.npz"}
"""`ditlab eval`'s names for ADM's reference batches"""


def home() -> Path:
    """The cache folder: $DITLAB_HOME, default ~/.cache/ditlab."""
    return Path(os.environ.get("DITLAB_HOME") or "~/.cache/ditlab").expanduser()


def offline() -> bool:
    return os.environ.get("DITLAB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def source_url(name: str) -> str:
    """Where `name` is fetched from: $DITLAB_MIRROR/name, else its own location."""
    mirror = os.environ.get("DITLAB_MIRROR", "").strip()
    if not mirror:
        return RELEASED[name].url
    if urlparse(mirror).scheme not in ("http", "https", "file"):
        raise UserError(f"DITLAB_MIRROR={mirror}: give an http://, https:// or file:// URL")
    return mirror.rstrip("/") + "/" + name


def reachable(url: str, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """None if a TCP connection to the host of `url` opens within `timeout`, else why not."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return None
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        socket.create_connection((parsed.hostname or "", port), timeout=timeout).close()
    except (OSError, ValueError) as e:
        return one_line(e)
    return None


def fetch(name: str, progress: bool = True) -> Path:
    """The cached file of the released `name`, downloaded and verified first if absent.
    Under torchrun rank 0 fetches first, the others wait at a barrier and then find it (or, with
    a cache folder of their own node, fetch it there under the lock)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from ditlab.runtime.distributed import barrier

        if dist.get_rank() == 0:
            path = _fetch(name, progress)
            barrier()
            return path
        barrier()
    return _fetch(name, progress)


def _fetch(name: str, progress: bool) -> Path:
    dst = home() / name
    if dst.is_file():
        return dst
    url = source_url(name)
    where = f"put {url} at {dst}"
    if offline():
        raise UserError(f"{name} is not in the cache and DITLAB_OFFLINE is set: {where}")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        lock = open(dst.with_name(f".{dst.name}.lock"), "w")
    except OSError as e:
        raise UserError(f"DITLAB_HOME {dst.parent}: cannot write there ({one_line(e)})") from e
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process is downloading it: wait, then find it
            print(f"waiting for another process downloading {name} into {dst.parent}", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if dst.is_file():
            return dst
        why = reachable(url)
        if why is not None:
            raise UserError(f"cannot reach {url} ({why}): {where}, or set DITLAB_MIRROR")
        part = dst.with_name(f".{dst.name}.part")
        _download(url, part, name, progress, where)
        _verify(name, part, url)
        with open(part, "rb") as f:
            os.fsync(f.fileno())
        os.replace(part, dst)
    return dst


def _open(url: str, offset: int) -> tuple[BinaryIO, int, int]:
    """(stream, the offset it starts at, total bytes) for `url` from byte `offset` on (Range)."""
    if urlparse(url).scheme == "file":
        path = Path(url2pathname(urlparse(url).path))
        f = open(path, "rb")  # FileNotFoundError: the caller says what to do
        f.seek(offset)
        return f, offset, path.stat().st_size
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        resp = urllib.request.urlopen(request, timeout=READ_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # the part is complete, or longer than the file: start again
            return _open(url, 0)
        raise
    if resp.status == 206:  # "Content-Range: bytes START-END/TOTAL"
        start, total = resp.headers["Content-Range"].split()[1].replace("-", "/").split("/")[0::2]
        return resp, int(start), int(total)
    length = resp.headers.get("Content-Length")
    return resp, 0, int(length) if length is not None else -1


def _download(url: str, part: Path, name: str, progress: bool, where: str) -> None:
    """Bring `part` to the whole file, resuming from its current length."""
    from tqdm.auto import tqdm

    for _ in range(RESUME_ATTEMPTS):
        have = part.stat().st_size if part.exists() else 0
        try:
            stream, start, total = _open(url, have)
        except FileNotFoundError as e:
            raise UserError(f"the mirror has no {name} ({url}): {where}") from e
        except (urllib.error.URLError, OSError) as e:
            raise UserError(f"cannot download {url} ({one_line(e)}): {where}") from e
        with stream, open(part, "r+b" if start else "wb") as out, \
                tqdm(total=total if total >= 0 else None, initial=start, unit="B", unit_scale=True, desc=name,
                     disable=not progress) as bar:
            out.seek(start)
            out.truncate()
            try:
                while chunk := stream.read(CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException):  # the connection dropped: resume if this attempt got anywhere
                pass
            got = out.tell()
        if total >= 0 and got == total or total < 0 and got > start:
            return
        if got <= have:
            break
    raise UserError(f"download of {url} interrupted at {got} of {total} bytes; run again to resume, or {where}")


def _verify(name: str, path: Path, url: str) -> None:
    """The SHA-256 prefix (where known) and the structural check of `name`; removes a bad file."""
    entry = RELEASED[name]
    try:
        if entry.sha256_prefix:
            digest = file_sha256(path)
            if not digest.startswith(entry.sha256_prefix):
                raise UserError(f"SHA-256 {digest[:16]}... does not start with {entry.sha256_prefix}")
        CHECKS[entry.kind](path)
    except UserError as e:
        path.unlink(missing_ok=True)
        raise UserError(f"{url}: not a valid {name} ({one_line(e)}); removed it") from e


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        shutil.copyfileobj(f, _HashWriter(h), CHUNK)
    return h.hexdigest()


class _HashWriter:
    def __init__(self, h: hashlib._Hash):
        self.h = h

    def write(self, data: bytes) -> None:
        self.h.update(data)


def check_checkpoint(path: Path) -> None:
    """It loads as the weights of a DiT: a bare state dict (or a training checkpoint's "ema") whose
    tensors have the shapes of the DiT they describe."""
    import torch

    from ditlab.checkpoints.state import torch_load
    from ditlab.models.dit import DiT
    from ditlab.models.weights import check_weights, infer_config

    obj = torch_load(path, "a DiT checkpoint")
    sd = obj.get("ema", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or "x_embedder.proj.weight" not in sd:
        raise UserError("not a DiT state dict")
    try:
        with torch.device("meta"):
            shell = DiT(**infer_config(sd, num_heads=1))  # structure only: the weights do not store heads
        check_weights(shell, sd)
    except (TypeError, ValueError) as e:
        raise UserError(one_line(e)) from e


def check_reference(path: Path) -> None:
    """It opens as an ADM batch: uint8 images (N, H, W, 3) in arr_0, well-formed statistics if any."""
    from ditlab.evaluation.batches import NpzImages, load_stats

    NpzImages(str(path))
    load_stats(str(path))


def check_inception(path: Path) -> None:
    """It loads, strictly, as the state dict of `evaluation.inception.InceptionV3`."""
    from ditlab.evaluation.inception import load_inception

    load_inception(str(path))


def check_idx(path: Path) -> None:
    """It reads as an IDX file: magic, dimensions and length (`data.idx`)."""
    from ditlab.data.idx import read_idx

    read_idx(path)


CHECKS = {"checkpoint": check_checkpoint, "reference": check_reference, "inception": check_inception,
          "idx": check_idx}
