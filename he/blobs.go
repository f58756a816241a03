package he

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"kmsd/internal/fileutil"
)

// BlobStore keeps public material (public and evaluation keys) as files
// named by the SHA-256 of their content, under one directory. A blob is
// written to a temp file, fsynced, renamed into place, and the directory is
// fsynced: a crash leaves a whole blob or none, plus at most a temp file that
// Open removes.
type BlobStore struct {
	dir string
}

const tmpPrefix = ".tmp-"

// OpenBlobStore opens (creating) the store and removes temp files a crash
// left behind.
func OpenBlobStore(dir string) (*BlobStore, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), tmpPrefix) {
			if err := os.Remove(filepath.Join(dir, e.Name())); err != nil {
				return nil, err
			}
		}
	}
	return &BlobStore{dir: dir}, nil
}

// Digest is "sha256:<hex>".
type Digest string

func (d Digest) hex() (string, error) {
	h, ok := strings.CutPrefix(string(d), "sha256:")
	if !ok || len(h) != 64 {
		return "", fmt.Errorf("malformed digest %q", clip(string(d)))
	}
	if _, err := hex.DecodeString(h); err != nil || strings.ToLower(h) != h {
		return "", fmt.Errorf("malformed digest %q", clip(string(d)))
	}
	return h, nil
}

// Path is the file of a blob.
func (b *BlobStore) Path(d Digest) (string, error) {
	h, err := d.hex()
	if err != nil {
		return "", err
	}
	return filepath.Join(b.dir, h), nil
}

// Put streams a blob from write into the store and returns its digest and
// size. Nothing is buffered whole in memory.
func (b *BlobStore) Put(write func(io.Writer) error) (Digest, int64, error) {
	f, err := os.CreateTemp(b.dir, tmpPrefix+"*")
	if err != nil {
		return "", 0, err
	}
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	h := sha256.New()
	cw := &countingWriter{w: io.MultiWriter(f, h)}
	bw := bufio.NewWriterSize(cw, 1<<20)
	if err := write(bw); err != nil {
		return "", 0, err
	}
	if err := bw.Flush(); err != nil {
		return "", 0, err
	}
	if err := f.Sync(); err != nil {
		return "", 0, err
	}
	if err := f.Close(); err != nil {
		return "", 0, err
	}
	d := Digest("sha256:" + hex.EncodeToString(h.Sum(nil)))
	path, _ := b.Path(d)
	if err := os.Rename(tmp, path); err != nil {
		return "", 0, err
	}
	ok = true
	if err := fileutil.SyncDir(b.dir); err != nil {
		return "", 0, err
	}
	return d, cw.n, nil
}

type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// Open opens a blob for reading.
func (b *BlobStore) Open(d Digest) (*os.File, error) {
	p, err := b.Path(d)
	if err != nil {
		return nil, err
	}
	return os.Open(p)
}

// RemoveOrphans deletes every blob not in keep (the blobs that committed
// versions reference), as after a crashed generation. It returns how many it
// removed.
func (b *BlobStore) RemoveOrphans(keep map[Digest]bool) (int, error) {
	ents, err := os.ReadDir(b.dir)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, e := range ents {
		d := Digest("sha256:" + e.Name())
		if _, err := d.hex(); err != nil || keep[d] {
			continue
		}
		if err := os.Remove(filepath.Join(b.dir, e.Name())); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return n, err
		}
		n++
	}
	return n, nil
}

// Remove deletes a blob; a missing one is not an error.
func (b *BlobStore) Remove(d Digest) error {
	p, err := b.Path(d)
	if err != nil {
		return err
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}
