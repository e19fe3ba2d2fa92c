"""Write the tree of one commit of a bare git directory into a folder, skipping blobs the mirror lacks.

Usage: python3 extract_tree.py GIT_DIR COMMIT DEST
The fetch tool's snapshots may list their largest files without holding them; `git archive` stops at the
first such file, so this walks `git ls-tree -r` and writes every blob that is present.
"""
import os
import subprocess
import sys


def main() -> None:
    git_dir, commit, dest = sys.argv[1:4]
    out = subprocess.run(["git", "--git-dir", git_dir, "ls-tree", "-r", "-z", commit],
                         check=True, capture_output=True).stdout.decode()
    entries = [e for e in out.split("\0") if e]
    shas = []
    meta = []
    for e in entries:
        head, path = e.split("\t", 1)
        mode, kind, sha = head.split()
        if kind != "blob":
            continue
        shas.append(sha)
        meta.append((mode, sha, path))
    # one cat-file --batch for all blobs; missing ones answer "<sha> missing"
    proc = subprocess.run(["git", "--git-dir", git_dir, "cat-file", "--batch"],
                          input=("\n".join(shas) + "\n").encode(), capture_output=True, check=True)
    buf = proc.stdout
    pos = 0
    skipped = []
    for mode, sha, path in meta:
        nl = buf.index(b"\n", pos)
        header = buf[pos:nl].decode().split()
        pos = nl + 1
        if header[-1] == "missing":
            skipped.append(path)
            continue
        size = int(header[2])
        data = buf[pos:pos + size]
        pos += size + 1
        target = os.path.join(dest, path)
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        if mode == "120000":
            if os.path.lexists(target):
                os.remove(target)
            os.symlink(data.decode(), target)
            continue
        with open(target, "wb") as f:
            f.write(data)
        if mode == "100755":
            os.chmod(target, 0o755)
    print(f"{dest}: {len(meta) - len(skipped)} files written, {len(skipped)} absent from the mirror")
    for p in skipped[:20]:
        print("  absent:", p)


if __name__ == "__main__":
    main()
