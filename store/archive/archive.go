// Package archive keeps the audit log as a C2SP tlog-tiles log
// (c2sp.org/tlog-tiles; paths in api/layout): the records a signed
// checkpoint covers are written out as entry bundles and Merkle tree
// tiles, full ones once and never again, with the checkpoint last, to a
// Bucket (a directory, or an S3-compatible bucket). Any tlog-tiles client
// reads the log from there, or from kmsd's /v1/audit/tiles/.
package archive

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"golang.org/x/mod/sumdb/tlog"

	"github.com/kmsd-project/kmsd/api/layout"
	"github.com/kmsd-project/kmsd/audit"
	"github.com/kmsd-project/kmsd/kms"
)

// Bucket is where the archive's resources live.
type Bucket interface {
	// Put stores data at path durably before it returns. An immutable
	// resource (a tile or bundle) is written once: Put of the same bytes
	// again succeeds, of other bytes fails with ErrConflict and changes
	// nothing. A mutable one (the checkpoint) is replaced whole.
	Put(ctx context.Context, path string, data []byte, immutable bool) error
	// Get returns the resource at path; an error matching
	// kms.ErrNotFound if there is none.
	Get(ctx context.Context, path string) ([]byte, error)
	// String names the bucket for logs.
	String() string
}

// ErrConflict: the archive holds other bytes at an immutable path than
// the log says belong there: another log's archive, or one edited.
var ErrConflict = errors.New("the archive holds other bytes than the log's at an immutable path")

// Writer archives what the log's checkpoints cover.
type Writer struct {
	Bucket Bucket
	Store  kms.AuditStore
	Logger *slog.Logger
	// Root is the root of the log's tree of size n from the store's own
	// rows (engine.Log.TrustedRoot); nil: computed from Store's hashes.
	Root func(ctx context.Context, n uint64) (tlog.Hash, error)
	// Progress, if set, keeps in the store (tagged, digested) how much the
	// archive holds, so that an archive rolled back or wiped under kmsd
	// (an older checkpoint put back, files deleted) is found, not written
	// over as if it were whole.
	Progress Progress

	mu       sync.Mutex
	archived atomic.Uint64 // the size the archive's checkpoint covers
	loaded   bool
}

// Progress is where a Writer keeps how far the archive went: kmsd's
// metadata in its store (store.Backend).
type Progress interface {
	Meta(key string) ([]byte, error)
	PutMeta(key string, value []byte) error
}

// progressKey is the metadata record of the size the archive holds.
const progressKey = "x-audit-archived"

// ErrRolledBack: the archive holds less than it did (its checkpoint went
// back, or is gone): kmsd does not write over it.
var ErrRolledBack = errors.New("the audit archive holds less than it did: it was rolled back or wiped (restore it; kmsd does not write over it)")

// recorded is the size the store says the archive held (0: none yet).
func (w *Writer) recorded() (uint64, error) {
	if w.Progress == nil {
		return 0, nil
	}
	b, err := w.Progress.Meta(progressKey)
	if err != nil || b == nil {
		return 0, err
	}
	return strconv.ParseUint(string(b), 10, 64)
}

// Archived is the tree size the archive's checkpoint covers (0 before the
// first Sync). It does not wait for a Sync under way.
func (w *Writer) Archived() uint64 { return w.archived.Load() }

// resumeFrom is where a Sync takes up: the size of the archive's
// checkpoint, if that checkpoint is this log's (its root is the one the
// store's rows give for its size). One that is not (another log's
// archive, or a checkpoint edited to move the writer on or back) is not
// taken: the archive is written from the start again, immutable
// resources compared, or, where the store no longer holds the records to
// write again, archiving stops with an error.
func (w *Writer) resumeFrom(ctx context.Context, note []byte) (uint64, error) {
	t, err := ParseCheckpoint(note)
	if err != nil {
		return 0, fmt.Errorf("the archive's checkpoint: %w", err)
	}
	size, err := w.Store.AuditSize(ctx)
	if err != nil {
		return 0, err
	}
	var root tlog.Hash
	if uint64(t.N) <= size {
		if w.Root != nil {
			root, err = w.Root(ctx, uint64(t.N))
		} else {
			root, err = tlog.TreeHash(t.N, audit.HashReader(ctx, w.Store))
		}
	}
	if uint64(t.N) > size || err != nil || root != t.Hash {
		if w.Root != nil {
			if _, rerr := w.Root(ctx, 0); rerr != nil {
				// The store was pruned: the records cannot be written
				// again from it.
				return 0, fmt.Errorf("the archive's checkpoint (size %d) is not this log's, and the store was pruned: check the archive (kmsctl audit verify --archive)", t.N)
			}
		}
		if w.Logger != nil {
			w.Logger.Error("audit archive: its checkpoint is not this log's (another log's archive, or edited): writing the archive from the start again", "archive", w.Bucket.String(), "checkpoint_size", t.N, "log_size", size)
		}
		return 0, nil
	}
	return uint64(t.N), nil
}

// CheckpointSize reads the tree size from a checkpoint's second line
// (its signature is the reader's to check).
func CheckpointSize(note []byte) (uint64, error) {
	lines := strings.SplitN(string(note), "\n", 3)
	if len(lines) < 3 {
		return 0, errors.New("malformed checkpoint")
	}
	n, err := strconv.ParseUint(lines[1], 10, 64)
	if err != nil {
		return 0, errors.New("malformed checkpoint: the size line")
	}
	// A tree of more records than an int64 counts is no log's (the tree
	// code works in int64).
	if n > MaxSize64 {
		return 0, fmt.Errorf("malformed checkpoint: size %d", n)
	}
	return n, nil
}

// MaxSize64 bounds a checkpoint's size: 2^62 records.
const MaxSize64 = 1 << 62

// Sync archives everything the newest checkpoint covers that the archive
// does not hold yet, then writes that checkpoint. It returns the size the
// archive covers. A crash at any point leaves an archive whose checkpoint
// covers what it held before; the next Sync writes the rest (the same
// bytes at the same paths).
func (w *Writer) Sync(ctx context.Context) (uint64, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	// The archive's checkpoint, read at every pass: an archive that went
	// back under kmsd (or since the store recorded its size) is refused.
	b, err := w.Bucket.Get(ctx, layout.CheckpointPath)
	var have uint64
	switch {
	case errors.Is(err, kms.ErrNotFound):
	case err != nil:
		return w.archived.Load(), fmt.Errorf("read the archive's checkpoint: %w", err)
	default:
		if have, err = CheckpointSize(b); err != nil {
			return w.archived.Load(), fmt.Errorf("the archive's checkpoint: %w", err)
		}
	}
	rec, err := w.recorded()
	if err != nil {
		return w.archived.Load(), fmt.Errorf("read how far the archive went: %w", err)
	}
	if have < max(rec, w.archived.Load()) {
		return w.archived.Load(), fmt.Errorf("%w: its checkpoint covers %d records, it held %d", ErrRolledBack, have, max(rec, w.archived.Load()))
	}
	if !w.loaded && have > 0 {
		from, err := w.resumeFrom(ctx, b)
		if err != nil {
			return 0, err
		}
		if from < rec {
			return 0, fmt.Errorf("%w: its checkpoint is not this log's, and it held %d records", ErrRolledBack, rec)
		}
		w.archived.Store(from)
	}
	w.loaded = true
	size, note, err := w.Store.LatestCheckpoint(ctx)
	if errors.Is(err, kms.ErrNotFound) || (err == nil && size <= w.archived.Load()) {
		return w.archived.Load(), nil
	}
	if err != nil {
		return w.archived.Load(), err
	}
	hr := audit.HashReader(ctx, w.Store)
	done := w.archived.Load()
	// Level 0: the entry bundles and the leaf hash tiles that became
	// full; then every level above where a tile became full.
	for n := layout.FullTiles(done, 0); n < layout.FullTiles(size, 0); n++ {
		if err := w.putBundle(ctx, n, layout.TileWidth); err != nil {
			return w.archived.Load(), err
		}
	}
	for level := 0; level < 64 && (layout.FullTiles(size, level) > 0 || layout.PartialWidth(size, level) > 0); level++ {
		for n := layout.FullTiles(done, level); n < layout.FullTiles(size, level); n++ {
			if err := w.putTile(ctx, hr, level, n, layout.TileWidth); err != nil {
				return w.archived.Load(), err
			}
		}
		// The partial tile of this checkpoint's size (its path names its
		// width, so it too is written once).
		if pw := layout.PartialWidth(size, level); pw > 0 {
			if err := w.putTile(ctx, hr, level, layout.FullTiles(size, level), pw); err != nil {
				return w.archived.Load(), err
			}
		}
	}
	if pw := layout.PartialWidth(size, 0); pw > 0 {
		if err := w.putBundle(ctx, layout.FullTiles(size, 0), pw); err != nil {
			return w.archived.Load(), err
		}
	}
	if err := w.Bucket.Put(ctx, layout.CheckpointPath, note, false); err != nil {
		return w.archived.Load(), fmt.Errorf("archive the checkpoint: %w", err)
	}
	if w.Progress != nil {
		if err := w.Progress.PutMeta(progressKey, []byte(strconv.FormatUint(size, 10))); err != nil {
			return w.archived.Load(), fmt.Errorf("record how far the archive went: %w", err)
		}
	}
	w.archived.Store(size)
	return size, nil
}

// putTile writes tile n of level, width hashes wide.
func (w *Writer) putTile(ctx context.Context, hr tlog.HashReader, level int, n uint64, width int) error {
	data, err := tlog.ReadTileData(tlog.Tile{H: layout.TileHeight, L: level, N: int64(n), W: width}, hr)
	if err != nil {
		return fmt.Errorf("read tile %d/%d: %w", level, n, err)
	}
	return w.put(ctx, layout.TilePath(level, n, width), data)
}

// putBundle writes entry bundle n, width entries.
func (w *Writer) putBundle(ctx context.Context, n uint64, width int) error {
	start := n * layout.TileWidth
	recs, err := w.Store.AuditRecords(ctx, start, start+uint64(width))
	if err != nil {
		return fmt.Errorf("read records %d-%d: %w", start, start+uint64(width)-1, err)
	}
	if len(recs) != width {
		return fmt.Errorf("read records %d-%d: got %d", start, start+uint64(width)-1, len(recs))
	}
	b, err := Bundle(recs)
	if err != nil {
		return err
	}
	return w.put(ctx, layout.EntriesPath(n, width), b)
}

func (w *Writer) put(ctx context.Context, path string, data []byte) error {
	if err := w.Bucket.Put(ctx, path, data, true); err != nil {
		return fmt.Errorf("archive %s: %w", path, err)
	}
	return nil
}

// Bundle encodes entries as an entry bundle: each a big-endian uint16
// length, then its bytes.
func Bundle(entries [][]byte) ([]byte, error) {
	var b bytes.Buffer
	for i, e := range entries {
		if len(e) > layout.MaxEntry {
			return nil, fmt.Errorf("entry %d is %d bytes: a bundle holds at most %d", i, len(e), layout.MaxEntry)
		}
		b.Write(binary.BigEndian.AppendUint16(nil, uint16(len(e))))
		b.Write(e)
	}
	return b.Bytes(), nil
}

// readBundle reads entry bundle n of width w and splits it; an error
// names the bundle.
func readBundle(ctx context.Context, b Bucket, n uint64, w int) ([][]byte, error) {
	p := layout.EntriesPath(n, w)
	raw, err := b.Get(ctx, p)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", p, err)
	}
	entries, err := Entries(raw)
	if err == nil && len(entries) != w {
		err = fmt.Errorf("%d entries, want %d", len(entries), w)
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %w", p, err)
	}
	return entries, nil
}

// Entries splits an entry bundle.
func Entries(b []byte) ([][]byte, error) {
	var out [][]byte
	for len(b) > 0 {
		if len(b) < 2 {
			return nil, errors.New("entry bundle: a truncated length")
		}
		n := int(binary.BigEndian.Uint16(b))
		if len(b) < 2+n {
			return nil, errors.New("entry bundle: a truncated entry")
		}
		out = append(out, b[2:2+n])
		b = b[2+n:]
	}
	return out, nil
}
