"""Writing a package into an export target that other local users might be able to write to.

The exporter runs as root (or as the service user with CAP_DAC_OVERRIDE). A name in a directory
that another user can write is theirs to rename, replace or point elsewhere with a symlink; had
root's ffmpeg written ``<target>/.NVRG-….tmp/<clip>`` by path, a user could move that directory
away, plant one of their own holding a dangling symlink under the clip's name, and have root
create a file anywhere, then see their own directory renamed into place as the "package".
So nothing here is reached through a path someone else could re-point:

- the target is opened once and refused when a user other than root or this process could
  rename entries in it: owned by another user, or writable by group or others without the
  sticky bit (the same rule for every directory above it);
- the package is built in a directory this export creates itself (``mkdirat`` under a random
  name, which fails if the name exists), mode 0700, opened with ``O_NOFOLLOW`` and checked to be
  the very directory just made: nobody else can add, swap or link anything inside it;
- ffmpeg writes to ``/proc/self/fd/N/<clip>``, N being that directory's descriptor handed to it:
  the kernel resolves this through the descriptor, whatever the names in the target say by then;
  every other file is created ``O_CREAT|O_EXCL|O_NOFOLLOW`` relative to the same descriptor;
- before the rename, the directory and each file are checked (owner, type, mode, link count, the
  exact list of names), and that the temporary name still leads to this directory; after it,
  that the final name does. On failure the directory is emptied through its descriptor and
  removed wherever it now is in the target, so nothing is left behind.

Who may read the finished package: its owner (the daemon) and one group (``export.group``), whose
members the admin chooses (technicians, auditors) — footage is never left readable by everyone
on the host. The modes are set explicitly (``fchmod``), so the daemon's umask (0077 under the
unit) does not matter. The group comes from the target itself when the target is that group's
with the setgid bit (new entries inherit the group: no ``chown`` needed, which the unit's system
call filter forbids), else from ``fchown``, which root or a member of the group may do. When
neither gives the package its group, the export is refused before anything is written.
"""

from __future__ import annotations

import ctypes
import errno
import grp
import hashlib
import os
import secrets
import stat
from pathlib import Path

from nvr_guard.errors import PolicyRefused, RuntimeFailure

DIR_MODE = 0o750  # the finished package: its owner and the export group (export.group)
FILE_MODE = 0o640
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


_libc = ctypes.CDLL(None, use_errno=True)
_RENAME_NOREPLACE = 1


def _rename_noreplace(dfd: int, old: str, new: str) -> None:
    """Rename ``old`` to ``new`` in the directory ``dfd``, never replacing an existing ``new``
    (renameat2 RENAME_NOREPLACE; a plain rename would replace an empty directory someone put
    there). FileExistsError when ``new`` exists."""
    r = _libc.renameat2(dfd, os.fsencode(old), dfd, os.fsencode(new), _RENAME_NOREPLACE)
    if r == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EINVAL, errno.ENOSYS):
        raise OSError(err, os.strerror(err), new)
    # a filesystem without RENAME_NOREPLACE: a hard link cannot stand in for a directory, so
    # check, then rename (the check in commit() ran just before; this narrows the window)
    try:
        os.lstat(new, dir_fd=dfd)
    except FileNotFoundError:
        os.rename(old, new, src_dir_fd=dfd, dst_dir_fd=dfd)
        return
    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), new)


def _writable_by_others(st: os.stat_result, euid: int) -> str | None:
    """Why a user other than root or ``euid`` could rename entries in this directory, or None."""
    if st.st_uid not in (0, euid):
        return f"it belongs to uid {st.st_uid}"
    mode = st.st_mode
    if mode & stat.S_ISVTX:
        return None  # sticky: only an entry's owner (root, us) may rename or remove it
    who = [w for bit, w in ((stat.S_IWGRP, "its group"), (stat.S_IWOTH, "everyone")) if mode & bit]
    if who:
        return f"{' and '.join(who)} may write to it (mode {stat.S_IMODE(mode):04o}, no sticky bit)"
    return None


def check_target(path: Path, st: os.stat_result) -> None:
    """Refuse a target (``st`` is its fstat) in which another user could swap the package."""
    euid = os.geteuid()
    why = _writable_by_others(st, euid)
    if why is not None:
        raise PolicyRefused(
            f"export target {path} is not safe to write to: {why}, so another user could swap "
            "the package while it is written. Make root its owner and remove group/other write "
            "(chmod go-w), or set the sticky bit (chmod +t)"
        )
    real = Path(os.path.realpath(path))
    for above in real.parents:
        try:
            why = _writable_by_others(os.stat(above), euid)
        except OSError as e:
            raise PolicyRefused(
                f"export target {path}: cannot check {above} ({e.strerror})"
            ) from None
        if why is not None:
            raise PolicyRefused(
                f"export target {path} is not safe to write to: {above} above it is not "
                f"protected ({why}), so another user could replace the target itself"
            )


_ACL_XATTRS = ("system.posix_acl_access", "system.posix_acl_default")


def _drop_acls(fd: int, what: str, target: Path) -> None:
    """Remove the POSIX ACLs ``fd`` inherited from a default ACL of the target: with one, a
    user the ACL names reads the package whatever its mode (``fchmod`` only sets the ACL mask).
    Refuse the export when one cannot be removed."""
    for attr in _ACL_XATTRS:
        try:
            os.removexattr(fd, attr)
        except OSError as e:
            if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
                continue  # none there, or a file system without ACLs
            raise RuntimeFailure(
                f"cannot remove the access list {what} inherited in export target {target} "
                f"({e.strerror}); it would let others read the package: nothing was exported"
            ) from None


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


class PackageDir:
    """The private directory a package is built in, reached only through descriptors.

    ``target_fd`` is the target opened by the caller (or by this class from ``target``)."""

    def __init__(
        self, target: Path, stem: str, *, target_fd: int | None = None, group: int | None = None
    ) -> None:
        self.target = target
        # the gid the package is given: the export group, else the daemon's own (never what a
        # setgid target would hand down: that group was not chosen by the config)
        self.group = os.getegid() if group is None else group
        self._own_target_fd = target_fd is None
        self.dfd = os.open(target, _OPEN_DIR) if target_fd is None else os.dup(target_fd)
        self.fd = -1
        try:
            dst = os.fstat(self.dfd)
            check_target(target, dst)
            self._target_id = (dst.st_dev, dst.st_ino)
            self.name, self.fd = self._make(stem)
        except BaseException:
            self.close()
            raise
        st = os.fstat(self.fd)
        self._id = (st.st_dev, st.st_ino)

    def _make(self, stem: str) -> tuple[str, int]:
        # the leading dot and the .tmp ending keep remove_stale_exports finding it after a crash
        for _ in range(16):
            name = f".{stem}.{secrets.token_hex(6)}.tmp"
            try:
                os.mkdir(name, 0o700, dir_fd=self.dfd)
            except FileExistsError:
                continue
            fd = os.open(name, _OPEN_DIR | os.O_NOFOLLOW, dir_fd=self.dfd)
            st = os.fstat(fd)
            if (
                st.st_uid != os.geteuid()
                or stat.S_IMODE(st.st_mode) & ~stat.S_ISGID != 0o700  # setgid: from the target
                or os.listdir(fd)
                or (os.lstat(name, dir_fd=self.dfd).st_ino != st.st_ino)
            ):
                # swapped between mkdir and open: not ours; ours (if still there) is empty
                os.close(fd)
                self._remove_empty_ours_by_name(name)
                raise RuntimeFailure(
                    f"the temporary directory {name} in {self.target} was replaced as it was "
                    "created: another user is tampering with the export target"
                )
            try:
                _drop_acls(fd, name, self.target)  # before any file inherits the default ACL
                self._give_group(fd, name, st)
            except BaseException:
                os.close(fd)
                self._remove_empty_ours_by_name(name)
                raise
            return name, fd
        raise RuntimeFailure(f"cannot create a temporary directory in {self.target}")

    def _give_group(self, fd: int, what: str, st: os.stat_result) -> None:
        """Give ``fd`` the export group unless it has it already (inherited from a setgid
        target); refuse the export when that is not possible."""
        if st.st_gid == self.group:
            return
        try:
            os.fchown(fd, -1, self.group)
        except OSError as e:
            group = _group_name(self.group)
            raise RuntimeFailure(
                f"cannot give {what} in export target {self.target} the export group {group} "
                f"({e.strerror}), so the people who handle packages could not read it; "
                f"nothing was exported. Make the target the group's, with the setgid bit, "
                f"once: chgrp {group} {self.target} && chmod g+s {self.target}"
            ) from None

    def _remove_empty_ours_by_name(self, name: str) -> None:
        try:
            st = os.lstat(name, dir_fd=self.dfd)
            if st.st_uid == os.geteuid() and stat.S_ISDIR(st.st_mode):
                os.rmdir(name, dir_fd=self.dfd)
        except OSError:
            pass

    @property
    def path(self) -> Path:
        """The temporary directory's name in the target (for messages and hooks only)."""
        return self.target / self.name

    def proc_path(self, fname: str) -> Path:
        """A path that reaches ``fname`` in this directory through its descriptor (for ffmpeg,
        started with this descriptor passed at the same number)."""
        return Path(f"/proc/self/fd/{self.fd}/{fname}")

    # ---- files ------------------------------------------------------------------------------
    def create(self, fname: str, data: bytes) -> None:
        fd = os.open(
            fname,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            FILE_MODE,
            dir_fd=self.fd,
        )
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    def open(self, fname: str) -> int:
        return os.open(fname, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)

    def settle(self, fname: str) -> None:
        """fsync, then drop the file's cached pages so a read-back comes from the medium, not
        from memory (best effort: the kernel may keep pages it is still writing)."""
        fd = self.open(fname)
        try:
            os.fsync(fd)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def sha256(self, fname: str) -> tuple[str, int]:
        """(hex digest, size) of a file in the directory."""
        fd = self.open(fname)
        with os.fdopen(fd, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
            return digest, os.fstat(f.fileno()).st_size

    def sync(self) -> None:
        os.fsync(self.fd)

    # ---- commit -----------------------------------------------------------------------------
    def seal(self, names: set[str]) -> None:
        """Give the package its final modes, then check it holds exactly ``names``, each a plain
        file of ours with one link, and is itself our directory."""
        euid = os.geteuid()
        present = set(os.listdir(self.fd))
        if present != names:
            extra, missing = sorted(present - names), sorted(names - present)
            raise RuntimeFailure(
                f"the package being written in {self.target} does not hold what was written "
                f"(unexpected {extra}, missing {missing}); nothing was exported"
            )
        for fname in sorted(names):
            fd = self.open(fname)
            try:
                _drop_acls(fd, fname, self.target)
                self._give_group(fd, fname, os.fstat(fd))
                os.fchmod(fd, FILE_MODE)
                st = os.fstat(fd)
            finally:
                os.close(fd)
            if (
                not stat.S_ISREG(st.st_mode)
                or st.st_uid != euid
                or st.st_nlink != 1
                or st.st_gid != self.group
            ):
                raise RuntimeFailure(
                    f"{fname} in the package being written in {self.target} is not a plain file "
                    f"owned by this process (uid {st.st_uid}, {st.st_nlink} links); nothing was "
                    "exported"
                )
        os.fchmod(self.fd, DIR_MODE)
        st = os.fstat(self.fd)
        if st.st_uid != euid or stat.S_IMODE(st.st_mode) != DIR_MODE or st.st_gid != self.group:
            raise RuntimeFailure(
                f"the package directory in {self.target} is not owned by this process or has "
                f"mode {stat.S_IMODE(st.st_mode):04o} or group {st.st_gid}; nothing was exported"
            )

    def _is_ours(self, name: str) -> bool:
        try:
            st = os.lstat(name, dir_fd=self.dfd)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._id

    def commit(self, final: str) -> None:
        """Rename the directory to ``final`` in the target, after checking the temporary name
        still leads to it, and check the final name does afterwards."""
        try:
            where = os.stat(self.target)
        except OSError as e:
            raise RuntimeFailure(f"export target {self.target} is gone ({e.strerror})") from None
        if (where.st_dev, where.st_ino) != self._target_id:
            raise RuntimeFailure(
                f"export target {self.target} was replaced during the export; nothing was exported"
            )
        if not self._is_ours(self.name):
            raise RuntimeFailure(
                f"the temporary package directory {self.name} in {self.target} was moved or "
                "replaced during the export; nothing was exported"
            )
        try:
            os.lstat(final, dir_fd=self.dfd)
        except FileNotFoundError:
            pass
        else:
            raise RuntimeFailure(
                f"{self.target / final} already exists; run the export again in a second"
            )
        try:
            _rename_noreplace(self.dfd, self.name, final)
        except FileExistsError:
            raise RuntimeFailure(
                f"{self.target / final} appeared during the export (someone else created it); "
                "nothing was exported: run the export again"
            ) from None
        if not self._is_ours(final):
            raise RuntimeFailure(
                f"{self.target / final} is not the package this export wrote; nothing was exported"
            )
        self.name = final
        os.fsync(self.dfd)

    # ---- clean-up ---------------------------------------------------------------------------
    def discard(self) -> None:
        """Empty the directory through its descriptor and remove it from the target, under
        whatever name it has now (someone may have renamed it)."""
        if self.fd >= 0:
            try:
                for fname in os.listdir(self.fd):
                    try:
                        os.unlink(fname, dir_fd=self.fd)
                    except IsADirectoryError:
                        pass
            except OSError:
                pass
        names = [self.name]
        if not self._is_ours(self.name):
            try:
                names = [n for n in os.listdir(self.dfd) if self._is_ours(n)]
            except OSError:
                names = []
        for name in names:
            try:
                os.rmdir(name, dir_fd=self.dfd)
            except OSError:
                pass  # gone already, or the medium went away: the caller reports it
        try:
            os.fsync(self.dfd)
        except OSError:
            pass

    def close(self) -> None:
        for fd in (self.fd, self.dfd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.fd = self.dfd = -1
