package archive

import (
	"context"
	"fmt"
	"sync"

	"golang.org/x/mod/sumdb/tlog"

	"github.com/kmsd-project/kmsd/api/layout"
)

// Cold reads pruned records and tree hashes back from an archive (the
// audit engine's engine.Cold), using the tiles the archive's checkpoint
// covers. What it returns is the archive's: a proof built from an edited
// tile fails the client's check against the signed root, and kmsd's own
// checkpoints never read it (engine.Keep).
type Cold struct {
	Bucket Bucket

	mu   sync.Mutex
	size uint64 // the archive's checkpoint's size, last read
}

// covered is the size the archive's checkpoint covers, read again when
// an index past the last read is asked for.
func (c *Cold) covered(ctx context.Context, need uint64) (uint64, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.size >= need {
		return c.size, nil
	}
	b, err := c.Bucket.Get(ctx, layout.CheckpointPath)
	if err != nil {
		return 0, err
	}
	if c.size, err = CheckpointSize(b); err != nil {
		return 0, err
	}
	if c.size < need {
		return 0, fmt.Errorf("the archive covers %d records, not %d", c.size, need)
	}
	return c.size, nil
}

// width is the width of tile n at level in an archive of size records.
func width(size uint64, level int, n uint64) int {
	if n < layout.FullTiles(size, level) {
		return layout.TileWidth
	}
	return layout.PartialWidth(size, level)
}

// ColdRecords returns records [start, end) from the entry bundles.
func (c *Cold) ColdRecords(ctx context.Context, start, end uint64) ([][]byte, error) {
	if start >= end {
		return nil, nil
	}
	size, err := c.covered(ctx, end)
	if err != nil {
		return nil, err
	}
	var out [][]byte
	for n := start / layout.TileWidth; n*layout.TileWidth < end; n++ {
		p := layout.EntriesPath(n, width(size, 0, n))
		b, err := c.Bucket.Get(ctx, p)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", p, err)
		}
		entries, err := Entries(b)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", p, err)
		}
		first := n * layout.TileWidth
		for i, e := range entries {
			if idx := first + uint64(i); idx >= start && idx < end {
				out = append(out, e)
			}
		}
	}
	if uint64(len(out)) != end-start {
		return nil, fmt.Errorf("the archive holds %d of records [%d, %d)", len(out), start, end)
	}
	return out, nil
}

// ColdHashes returns tree hashes by storage index from the tiles.
func (c *Cold) ColdHashes(ctx context.Context, indexes []int64) ([]tlog.Hash, error) {
	out := make([]tlog.Hash, len(indexes))
	tiles := map[string][]byte{}
	for i, idx := range indexes {
		level, m := tlog.SplitStoredHashIndex(idx)
		last := uint64((m + 1) << level) // records the hash covers end here
		size, err := c.covered(ctx, last)
		if err != nil {
			return nil, err
		}
		t := tlog.TileForIndex(layout.TileHeight, idx)
		t.W = width(size, t.L, uint64(t.N))
		p := layout.TilePath(t.L, uint64(t.N), t.W)
		data, ok := tiles[p]
		if !ok {
			if data, err = c.Bucket.Get(ctx, p); err != nil {
				return nil, fmt.Errorf("%s: %w", p, err)
			}
			tiles[p] = data
		}
		if out[i], err = tlog.HashFromTile(t, data, idx); err != nil {
			return nil, fmt.Errorf("%s: %w", p, err)
		}
	}
	return out, nil
}
