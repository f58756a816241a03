package archive

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/kmsd-project/kmsd/api/layout"
	"github.com/kmsd-project/kmsd/kms"
)

// Dir is an archive in a directory, laid out as the tlog-tiles paths, so
// that any static file server serves it as the log.
type Dir struct {
	Root string
}

func (d Dir) String() string { return d.Root }

// file is path's file under the root. Paths come from api/layout; one
// that is not a tlog-tiles path is refused.
func (d Dir) file(path string) (string, error) {
	if _, err := layout.Parse(path); err != nil {
		return "", fmt.Errorf("%w: %q", err, path)
	}
	return filepath.Join(d.Root, filepath.FromSlash(path)), nil
}

// Put writes data to a temporary file beside the target, fsyncs it, and
// then links it in (immutable: never over another file) or renames it
// over the target (mutable), and fsyncs the directory. A crash leaves
// the target as it was or whole, never partly written; at worst a
// temporary file (".tmp-*"), which no path names.
func (d Dir) Put(ctx context.Context, path string, data []byte, immutable bool) error {
	name, err := d.file(path)
	if err != nil {
		return err
	}
	dir := filepath.Dir(name)
	if err := mkdirAll(dir); err != nil {
		return err
	}
	suffix := make([]byte, 8)
	rand.Read(suffix)
	tmp := filepath.Join(dir, ".tmp-"+hex.EncodeToString(suffix))
	if err := writeSync(tmp, data); err != nil {
		os.Remove(tmp)
		return err
	}
	defer os.Remove(tmp)
	if immutable {
		if err := os.Link(tmp, name); err != nil {
			if !errors.Is(err, fs.ErrExist) {
				return err
			}
			have, rerr := os.ReadFile(name)
			if rerr != nil {
				return rerr
			}
			if !bytes.Equal(have, data) {
				return fmt.Errorf("%w: %s", ErrConflict, path)
			}
			return nil // written before (a Sync cut short)
		}
	} else if err := os.Rename(tmp, name); err != nil {
		return err
	}
	return syncDir(dir)
}

// Get reads the resource at path.
func (d Dir) Get(ctx context.Context, path string) ([]byte, error) {
	name, err := d.file(path)
	if err != nil {
		return nil, err
	}
	b, err := os.ReadFile(name)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, kms.Wrap(kms.KindNotFound, "archive", err)
	}
	return b, err
}

func writeSync(name string, data []byte) error {
	f, err := os.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
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

func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// mkdirAll makes dir and the directories above it that are missing, each
// made durable in its parent.
func mkdirAll(dir string) error {
	if fi, err := os.Stat(dir); err == nil {
		if !fi.IsDir() {
			return fmt.Errorf("%s is not a directory", dir)
		}
		return nil
	}
	parent := filepath.Dir(dir)
	if parent != dir {
		if err := mkdirAll(parent); err != nil {
			return err
		}
	}
	if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
		return err
	}
	return syncDir(parent)
}
