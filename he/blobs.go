package he

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/kmsd-project/kmsd/internal/fileutil"
)

// Blobs is where the HE kinds keep public material (public and evaluation
// keys), each blob named by the SHA-256 of its content. DirBlobs, a local
// directory, is the default; package s3blobs keeps them in an S3 bucket
// that replicas share. Package blobtest is the suite every implementation
// passes.
//
// A blob is written in two steps so that generation can hash on every core
// while one goroutine makes the results durable: Stage streams it into a
// local spool file, hashing it on the way; Commit makes it visible under
// its digest. Nothing is visible under a digest that is not whole.
type Blobs interface {
	// Stage streams a blob from write into a spool file and hashes it.
	// The caller must Commit or Abort the result.
	Stage(write func(io.Writer) error) (*Staged, error)
	// Commit makes a staged blob visible under its digest (durable once
	// Sync returns) and removes its spool file, failed or not.
	Commit(ctx context.Context, s *Staged) error
	// Abort removes a staged blob's spool file.
	Abort(s *Staged)
	// Sync makes every Commit so far durable.
	Sync(ctx context.Context) error
	// Open opens a blob for reading; ErrBlobNotFound when there is none.
	Open(ctx context.Context, d Digest) (io.ReadSeekCloser, error)
	// Remove deletes a blob; a missing one is not an error.
	Remove(ctx context.Context, d Digest) error
	// RemoveOrphans deletes every blob not in keep (the blobs committed
	// versions list) that was written before before, and returns how many
	// it removed. A blob written since may belong to a generation still
	// running (on another replica, for a shared store).
	RemoveOrphans(ctx context.Context, keep map[Digest]bool, before time.Time) (int, error)
}

// ErrBlobNotFound: no blob has the digest.
var ErrBlobNotFound = errors.New("no such blob")

// Staged is a blob written to a spool file and hashed, not yet visible
// under its digest.
type Staged struct {
	Digest Digest
	Size   int64
	File   *os.File // the spool file, at its end
}

// Discard closes and removes the spool file.
func (s *Staged) Discard() {
	s.File.Close()
	os.Remove(s.File.Name())
}

// Spool streams write into a new file of dir named with prefix, hashing it
// on the way (buffered, never whole in memory): the Stage of every Blobs.
func Spool(dir, prefix string, write func(io.Writer) error) (*Staged, error) {
	f, err := os.CreateTemp(dir, prefix+"*")
	if err != nil {
		return nil, err
	}
	s := &Staged{File: f}
	h := sha256.New()
	cw := &countingWriter{w: io.MultiWriter(f, h)}
	bw := bufio.NewWriterSize(cw, 1<<20)
	err = write(bw)
	if err == nil {
		err = bw.Flush()
	}
	if err != nil {
		s.Discard()
		return nil, err
	}
	s.Digest = Digest("sha256:" + hex.EncodeToString(h.Sum(nil)))
	s.Size = cw.n
	return s, nil
}

// CleanSpool removes the spool files a crash left in dir.
func CleanSpool(dir, prefix string) error {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), prefix) {
			if err := os.Remove(filepath.Join(dir, e.Name())); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return err
			}
		}
	}
	return nil
}

// DirBlobs keeps blobs as files named by their digest under one
// directory. A blob is spooled to a temp file there, fsynced, renamed into
// place, and the directory is fsynced (Sync): a crash leaves a whole blob
// or none, plus at most a temp file that OpenDirBlobs removes.
type DirBlobs struct {
	dir string
}

var _ Blobs = (*DirBlobs)(nil)

const tmpPrefix = ".tmp-"

// OpenDirBlobs opens (creating) the directory and removes temp files a
// crash left behind.
func OpenDirBlobs(dir string) (*DirBlobs, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	if err := CleanSpool(dir, tmpPrefix); err != nil {
		return nil, err
	}
	return &DirBlobs{dir: dir}, nil
}

// Digest is "sha256:<hex>".
type Digest string

// Hex is the digest's 64 lower-case hex digits, or an error when it is
// malformed.
func (d Digest) Hex() (string, error) {
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
func (b *DirBlobs) Path(d Digest) (string, error) {
	h, err := d.Hex()
	if err != nil {
		return "", err
	}
	return filepath.Join(b.dir, h), nil
}

// Put stages, commits and syncs one blob: a convenience for tests and
// tools.
func Put(ctx context.Context, b Blobs, write func(io.Writer) error) (Digest, int64, error) {
	s, err := b.Stage(write)
	if err != nil {
		return "", 0, err
	}
	if err := b.Commit(ctx, s); err != nil {
		return "", 0, err
	}
	if err := b.Sync(ctx); err != nil {
		return "", 0, err
	}
	return s.Digest, s.Size, nil
}

func (b *DirBlobs) Stage(write func(io.Writer) error) (*Staged, error) {
	return Spool(b.dir, tmpPrefix, write)
}

// Commit fsyncs the spool file and renames it to its digest; the
// directory entry is durable after Sync.
func (b *DirBlobs) Commit(_ context.Context, s *Staged) error {
	if err := s.File.Sync(); err != nil {
		s.Discard()
		return err
	}
	if err := s.File.Close(); err != nil {
		os.Remove(s.File.Name())
		return err
	}
	path, err := b.Path(s.Digest)
	if err == nil {
		err = os.Rename(s.File.Name(), path)
	}
	if err != nil {
		os.Remove(s.File.Name())
		return err
	}
	return nil
}

func (b *DirBlobs) Abort(s *Staged) { s.Discard() }

// Sync fsyncs the directory, making the renames of Commit durable.
func (b *DirBlobs) Sync(context.Context) error { return fileutil.SyncDir(b.dir) }

type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

func (b *DirBlobs) Open(_ context.Context, d Digest) (io.ReadSeekCloser, error) {
	p, err := b.Path(d)
	if err != nil {
		return nil, err
	}
	// Not through a link, not a FIFO or a device someone put there.
	f, err := os.OpenFile(p, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: %s", ErrBlobNotFound, d)
	}
	if err != nil {
		return nil, err
	}
	fi, err := f.Stat()
	if err == nil && !fi.Mode().IsRegular() {
		err = fmt.Errorf("blob %s is not a regular file", d)
	}
	if err != nil {
		f.Close()
		return nil, err
	}
	v := fmt.Sprintf("file %d %d", fi.Size(), fi.ModTime().UnixNano())
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		v += fmt.Sprintf(" %d %d %d", st.Dev, st.Ino, st.Ctim.Nano())
	}
	return versionedFile{f, v}, nil
}

// Versioned is an opened blob that says what identifies its bytes as
// stored (a file's size, times and inode; an object's ETag, size and
// modification time): a server that checked the bytes against their digest
// need not check them again while this stays the same.
type Versioned interface {
	BlobVersion() string
}

type versionedFile struct {
	*os.File
	version string
}

func (v versionedFile) BlobVersion() string { return v.version }

func (b *DirBlobs) RemoveOrphans(_ context.Context, keep map[Digest]bool, before time.Time) (int, error) {
	ents, err := os.ReadDir(b.dir)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, e := range ents {
		d := Digest("sha256:" + e.Name())
		if _, err := d.Hex(); err != nil || keep[d] {
			continue
		}
		if fi, err := e.Info(); err != nil || !fi.ModTime().Before(before) {
			continue
		}
		if err := os.Remove(filepath.Join(b.dir, e.Name())); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return n, err
		}
		n++
	}
	return n, nil
}

func (b *DirBlobs) Remove(_ context.Context, d Digest) error {
	p, err := b.Path(d)
	if err != nil {
		return err
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}
