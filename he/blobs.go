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

	"github.com/kmsd-project/kmsd/internal/fileutil"
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
	p, err := b.write(write)
	if err != nil {
		return "", 0, err
	}
	if err := b.commit(p); err != nil {
		return "", 0, err
	}
	if err := fileutil.SyncDir(b.dir); err != nil {
		return "", 0, err
	}
	return p.digest, p.size, nil
}

// pendingBlob is a blob written to its temp file and hashed, not yet
// durable nor visible under its digest.
type pendingBlob struct {
	f      *os.File
	digest Digest
	size   int64
}

// write streams a blob into a new temp file, hashing it on the way. The
// caller must commit or abort the result.
func (b *BlobStore) write(write func(io.Writer) error) (*pendingBlob, error) {
	f, err := os.CreateTemp(b.dir, tmpPrefix+"*")
	if err != nil {
		return nil, err
	}
	p := &pendingBlob{f: f}
	h := sha256.New()
	cw := &countingWriter{w: io.MultiWriter(f, h)}
	bw := bufio.NewWriterSize(cw, 1<<20)
	err = write(bw)
	if err == nil {
		err = bw.Flush()
	}
	if err != nil {
		b.abort(p)
		return nil, err
	}
	p.digest = Digest("sha256:" + hex.EncodeToString(h.Sum(nil)))
	p.size = cw.n
	return p, nil
}

// commit makes a pending blob durable (fsync) and renames it to its
// digest. The directory entry is durable only after SyncDir.
func (b *BlobStore) commit(p *pendingBlob) error {
	if err := p.f.Sync(); err != nil {
		b.abort(p)
		return err
	}
	if err := p.f.Close(); err != nil {
		os.Remove(p.f.Name())
		return err
	}
	path, _ := b.Path(p.digest)
	if err := os.Rename(p.f.Name(), path); err != nil {
		os.Remove(p.f.Name())
		return err
	}
	return nil
}

// abort closes and removes a pending blob's temp file.
func (b *BlobStore) abort(p *pendingBlob) {
	p.f.Close()
	os.Remove(p.f.Name())
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
