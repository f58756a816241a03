package archive

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"strings"
	"syscall"

	"github.com/kmsd-project/kmsd/api/layout"
	"github.com/kmsd-project/kmsd/kms"
)

// Dir is an archive in a directory, laid out as the tlog-tiles paths, so
// that any static file server serves it as the log. Every operation goes
// through an os.Root on the directory: no path, symbolic link or ".."
// leads outside it; and only regular files are read, each no larger than
// its kind of resource can be (MaxSize), so a link to a device, a FIFO or
// a sparse giant planted in the archive is refused, never read.
type Dir struct {
	Root string
}

func (d Dir) String() string { return d.Root }

// MaxSize is the largest a resource at path can be: a full tile, a full
// bundle of the largest entries, or a signed checkpoint.
func MaxSize(p string) int64 {
	r, err := layout.Parse(p)
	switch {
	case err != nil:
		return 0
	case r.Checkpoint:
		return 64 << 10
	case r.Entries:
		return int64(r.Width) * (2 + layout.MaxEntry)
	}
	return int64(r.Width) * layout.HashSize
}

// open checks p and opens the directory as a root; the directory itself
// must be one, not a link to one (whose target whoever can write beside
// it could change).
func (d Dir) open(p string) (*os.Root, error) {
	if _, err := layout.Parse(p); err != nil {
		return nil, fmt.Errorf("%w: %q", err, p)
	}
	fi, err := os.Lstat(d.Root)
	if err != nil {
		return nil, err
	}
	if !fi.IsDir() {
		return nil, fmt.Errorf("the archive %s is not a directory (a symbolic link is refused)", d.Root)
	}
	return os.OpenRoot(d.Root)
}

// Put writes data to a temporary file beside the target, fsyncs it, and
// then links it in (immutable: never over another file) or renames it
// over the target (mutable), and fsyncs the directory. A crash leaves
// the target as it was or whole, never partly written; at worst a
// temporary file (".tmp-*"), which no path names.
func (d Dir) Put(ctx context.Context, p string, data []byte, immutable bool) error {
	root, err := d.open(p)
	if err != nil {
		return err
	}
	defer root.Close()
	dir := path.Dir(p)
	if err := mkdirAll(root, dir); err != nil {
		return err
	}
	suffix := make([]byte, 8)
	rand.Read(suffix)
	tmp := path.Join(dir, ".tmp-"+hex.EncodeToString(suffix))
	if err := writeSync(root, tmp, data); err != nil {
		root.Remove(tmp)
		return err
	}
	defer root.Remove(tmp)
	if immutable {
		if err := root.Link(tmp, p); err != nil {
			if !errors.Is(err, fs.ErrExist) {
				return err
			}
			have, rerr := readRegular(root, p)
			if rerr != nil {
				return fmt.Errorf("%w: %s: %v", ErrConflict, p, rerr)
			}
			if !bytes.Equal(have, data) {
				return fmt.Errorf("%w: %s", ErrConflict, p)
			}
			return nil // written before (a Sync cut short)
		}
	} else if err := root.Rename(tmp, p); err != nil {
		return err
	}
	return syncDir(root, dir)
}

// Get reads the resource at p: a regular file no larger than MaxSize(p).
func (d Dir) Get(ctx context.Context, p string) ([]byte, error) {
	root, err := d.open(p)
	if err != nil {
		return nil, err
	}
	defer root.Close()
	b, err := readRegular(root, p)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, kms.Wrap(kms.KindNotFound, "archive", err)
	}
	return b, err
}

// readRegular reads p if it is a regular file within its size bound,
// without following a link in its last element and without blocking on a
// FIFO.
func readRegular(root *os.Root, p string) ([]byte, error) {
	f, err := root.OpenFile(p, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	max := MaxSize(p)
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file", p)
	}
	// A hard link to a file elsewhere passes O_NOFOLLOW and the root:
	// the archive's files have one link (its own) and kmsd's owner.
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && st.Nlink == 2 && int(st.Uid) == os.Geteuid() && dropTmpLink(root, p, fi) {
		// A Put killed between linking its temporary file in and
		// removing it: the second link was that temporary file, now gone.
		fi, err = f.Stat()
		if err != nil {
			return nil, err
		}
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && (st.Nlink != 1 || int(st.Uid) != os.Geteuid()) {
		return nil, fmt.Errorf("%s has %d links or another owner: not a file kmsd wrote", p, st.Nlink)
	}
	if fi.Size() > max {
		return nil, fmt.Errorf("%s is %d bytes, more than such a resource can be (%d)", p, fi.Size(), max)
	}
	b, err := io.ReadAll(io.LimitReader(f, max+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > max {
		return nil, fmt.Errorf("%s is more than %d bytes", p, max)
	}
	return b, nil
}

// dropTmpLink removes a temporary file (".tmp-*") beside p that is the
// same file as p (fi): what a Put killed between its link and its remove
// left. It reports whether it removed one.
func dropTmpLink(root *os.Root, p string, fi os.FileInfo) bool {
	dir := path.Dir(p)
	d, err := root.Open(dir)
	if err != nil {
		return false
	}
	names, err := d.Readdirnames(-1)
	d.Close()
	if err != nil {
		return false
	}
	for _, n := range names {
		if !strings.HasPrefix(n, ".tmp-") {
			continue
		}
		tmp := path.Join(dir, n)
		if tfi, err := root.Lstat(tmp); err == nil && os.SameFile(tfi, fi) {
			return root.Remove(tmp) == nil
		}
	}
	return false
}

func writeSync(root *os.Root, name string, data []byte) error {
	f, err := root.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func syncDir(root *os.Root, dir string) error {
	// A directory, not a link to something that blocks (a FIFO put in its
	// place since it was made).
	f, err := root.OpenFile(dir, os.O_RDONLY|syscall.O_DIRECTORY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// mkdirAll makes dir and the directories above it that are missing (all
// inside the root), each made durable in its parent.
func mkdirAll(root *os.Root, dir string) error {
	if dir == "." {
		return nil
	}
	if fi, err := root.Lstat(dir); err == nil {
		if !fi.IsDir() {
			return fmt.Errorf("%s is not a directory", dir)
		}
		return nil
	}
	parent := path.Dir(dir)
	if err := mkdirAll(root, parent); err != nil {
		return err
	}
	if err := root.Mkdir(dir, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
		return err
	}
	return syncDir(root, parent)
}
