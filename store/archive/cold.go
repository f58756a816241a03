package archive

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"
	"sync"

	"golang.org/x/mod/sumdb/tlog"

	"github.com/kmsd-project/kmsd/api/layout"
)

// Cold reads pruned records and tree hashes back from an archive (the
// audit engine's engine.Cold). Nothing it returns is the archive's word
// alone: it takes the tree of the archive's checkpoint only if that
// checkpoint's root is the one the store's own rows give for its size
// (Root), and then reads every hash through tlog.TileHashReader, which
// proves each tile against that root, and checks every record against
// its proven leaf hash. An edited tile or bundle is an error naming it.
type Cold struct {
	Bucket Bucket
	// Root is the root of the log's tree of size n as the store's own
	// rows give it (engine.Log.TrustedRoot). Nil: the archive's own
	// checkpoint is taken (a reader that verifies its signature later).
	Root func(ctx context.Context, n uint64) (tlog.Hash, error)

	mu   sync.Mutex
	tree tlog.Tree // the archive's checkpoint, once shown to be the store's
}

// ParseCheckpoint reads the tree size and root from a checkpoint's text
// (its signature is the reader's to check).
func ParseCheckpoint(note []byte) (tlog.Tree, error) {
	lines := strings.SplitN(string(note), "\n", 4)
	if len(lines) < 4 {
		return tlog.Tree{}, errors.New("malformed checkpoint")
	}
	n, err := CheckpointSize(note)
	if err != nil {
		return tlog.Tree{}, err
	}
	root, err := base64.StdEncoding.DecodeString(lines[2])
	if err != nil || len(root) != tlog.HashSize {
		return tlog.Tree{}, errors.New("malformed checkpoint: the root line")
	}
	var h tlog.Hash
	copy(h[:], root)
	return tlog.Tree{N: int64(n), Hash: h}, nil
}

// trusted is the archive's tree if it covers need records and its root
// is the store's for its size.
func (c *Cold) trusted(ctx context.Context, need uint64) (tlog.Tree, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if uint64(c.tree.N) >= need {
		return c.tree, nil
	}
	b, err := c.Bucket.Get(ctx, layout.CheckpointPath)
	if err != nil {
		return tlog.Tree{}, err
	}
	t, err := ParseCheckpoint(b)
	if err != nil {
		return tlog.Tree{}, err
	}
	if uint64(t.N) < need {
		return tlog.Tree{}, fmt.Errorf("the archive covers %d records, not %d", t.N, need)
	}
	if c.Root == nil {
		// A reader without the store (kmsctl audit export): the tiles
		// are proven against the archive's own checkpoint, whose
		// signature the verification of the export checks.
		c.tree = t
		return t, nil
	}
	root, err := c.Root(ctx, uint64(t.N))
	if err != nil {
		return tlog.Tree{}, fmt.Errorf("the store's root of the archive's size %d: %w", t.N, err)
	}
	if root != t.Hash {
		return tlog.Tree{}, fmt.Errorf("%s: its root is not the store's for size %d: the archive is another log's, or was edited", layout.CheckpointPath, t.N)
	}
	c.tree = t
	return t, nil
}

// tiles reads tiles from the bucket for tlog.TileHashReader.
type tiles struct {
	ctx context.Context
	b   Bucket
}

func (t tiles) Height() int { return layout.TileHeight }

func (t tiles) ReadTiles(ts []tlog.Tile) ([][]byte, error) {
	out := make([][]byte, len(ts))
	for i, tl := range ts {
		p := layout.TilePath(tl.L, uint64(tl.N), tl.W)
		b, err := t.b.Get(t.ctx, p)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", p, err)
		}
		if len(b) != tl.W*layout.HashSize {
			return nil, fmt.Errorf("%s: %d bytes, want %d", p, len(b), tl.W*layout.HashSize)
		}
		out[i] = b
	}
	return out, nil
}

func (tiles) SaveTiles([]tlog.Tile, [][]byte) {}

// reader is a hash reader proven against the trusted tree covering need.
func (c *Cold) reader(ctx context.Context, need uint64) (tlog.HashReader, error) {
	t, err := c.trusted(ctx, need)
	if err != nil {
		return nil, err
	}
	return tlog.TileHashReader(t, tiles{ctx, c.Bucket}), nil
}

// ColdRecords returns records [start, end) from the entry bundles, each
// checked against its leaf hash as proven from the tiles.
func (c *Cold) ColdRecords(ctx context.Context, start, end uint64) ([][]byte, error) {
	if start >= end {
		return nil, nil
	}
	hr, err := c.reader(ctx, end)
	if err != nil {
		return nil, err
	}
	size := uint64(c.tree.N)
	var out [][]byte
	for n := start / layout.TileWidth; n*layout.TileWidth < end; n++ {
		w := width(size, 0, n)
		p := layout.EntriesPath(n, w)
		entries, err := readBundle(ctx, c.Bucket, n, w)
		if err != nil {
			return nil, err
		}
		first := n * layout.TileWidth
		var idx []int64
		var want [][]byte
		for i, e := range entries {
			if k := first + uint64(i); k >= start && k < end {
				idx = append(idx, tlog.StoredHashIndex(0, int64(k)))
				want = append(want, e)
			}
		}
		leaves, err := hr.ReadHashes(idx)
		if err != nil {
			return nil, err
		}
		for i, e := range want {
			if tlog.RecordHash(e) != leaves[i] {
				return nil, fmt.Errorf("%s: an entry is not the record the tree holds: the bundle was edited", p)
			}
		}
		out = append(out, want...)
	}
	if uint64(len(out)) != end-start {
		return nil, fmt.Errorf("the archive holds %d of records [%d, %d)", len(out), start, end)
	}
	return out, nil
}

// ColdHashes returns tree hashes by storage index, proven from the tiles.
func (c *Cold) ColdHashes(ctx context.Context, indexes []int64) ([]tlog.Hash, error) {
	var need uint64
	for _, idx := range indexes {
		level, m := tlog.SplitStoredHashIndex(idx)
		need = max(need, uint64((m+1)<<level))
	}
	hr, err := c.reader(ctx, need)
	if err != nil {
		return nil, err
	}
	return hr.ReadHashes(indexes)
}

// width is the width of tile n at level in an archive of size records.
func width(size uint64, level int, n uint64) int {
	if n < layout.FullTiles(size, level) {
		return layout.TileWidth
	}
	return layout.PartialWidth(size, level)
}

// TreeRoot is the root of the archive's tree of n records, from its
// tiles proven against its checkpoint (which must cover n).
func (c *Cold) TreeRoot(ctx context.Context, n uint64) (tlog.Hash, error) {
	hr, err := c.reader(ctx, n)
	if err != nil {
		return tlog.Hash{}, err
	}
	return tlog.TreeHash(int64(n), hr)
}
