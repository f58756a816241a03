package archive

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"

	"golang.org/x/mod/sumdb/tlog"

	"github.com/kmsd-project/kmsd/api/layout"
	"github.com/kmsd-project/kmsd/audit"
)

// Verify checks a whole archive against the identity key pub: its
// checkpoint is signed by pub; the level-0 tiles hash to the checkpoint's
// root; every entry bundle holds the entries those tiles name; the entries
// are the audit log's records (canonical, numbered, each naming its
// predecessor's hash); and every tile above level 0 is the tree's. The
// error names the first resource that does not match. saved, if not nil,
// is a checkpoint saved before (kmsctl audit verify --saved-checkpoint):
// the archive must extend it.
func Verify(ctx context.Context, b Bucket, pub []byte, saved ...[]byte) (*audit.Result, error) {
	note, err := b.Get(ctx, layout.CheckpointPath)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", layout.CheckpointPath, err)
	}
	c, err := audit.OpenCheckpoint(note, pub)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", layout.CheckpointPath, err)
	}
	var (
		leaves    []tlog.Hash
		records   [][]byte
		disagrees []uint64 // bundles whose entries are not their tile's leaves
	)
	for n := uint64(0); uint64(len(leaves)) < c.Size; n++ {
		w := width(c.Size, 0, n)
		tp := layout.TilePath(0, n, w)
		tile, err := b.Get(ctx, tp)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", tp, err)
		}
		if len(tile) != w*layout.HashSize {
			return nil, fmt.Errorf("%s: %d bytes, want %d", tp, len(tile), w*layout.HashSize)
		}
		entries, err := readBundle(ctx, b, n, w)
		if err != nil {
			return nil, err
		}
		agree := true
		for i, e := range entries {
			var leaf tlog.Hash
			copy(leaf[:], tile[i*layout.HashSize:])
			if tlog.RecordHash(e) != leaf {
				agree = false
			}
			leaves = append(leaves, leaf)
		}
		if !agree {
			disagrees = append(disagrees, n)
		}
		records = append(records, entries...)
	}
	if treeHash(leaves) != c.Root {
		if len(disagrees) > 0 {
			return nil, fmt.Errorf("%s: the tile does not match its entries or the checkpoint's root: it was edited", layout.TilePath(0, disagrees[0], width(c.Size, 0, disagrees[0])))
		}
		return nil, errors.New("the level-0 tiles do not hash to the checkpoint's root: the archive is not this checkpoint's log")
	}
	if len(disagrees) > 0 {
		n := disagrees[0]
		return nil, fmt.Errorf("%s: its entries are not the ones the tree (and the checkpoint) holds: it was edited", layout.EntriesPath(n, width(c.Size, 0, n)))
	}
	var savedNote []byte
	if len(saved) > 0 {
		savedNote = saved[0]
	}
	res, tree, err := audit.Verify(pub, records, [][]byte{note}, savedNote)
	if err != nil {
		var p *audit.Problem
		if errors.As(err, &p) && p.Index >= 0 {
			n := uint64(p.Index) / layout.TileWidth
			return nil, fmt.Errorf("%s: %w", layout.EntriesPath(n, width(c.Size, 0, n)), err)
		}
		return nil, err
	}
	for level := 1; layout.FullTiles(c.Size, level) > 0 || layout.PartialWidth(c.Size, level) > 0; level++ {
		last := layout.FullTiles(c.Size, level)
		if layout.PartialWidth(c.Size, level) > 0 {
			last++
		}
		for n := uint64(0); n < last; n++ {
			w := width(c.Size, level, n)
			p := layout.TilePath(level, n, w)
			want, err := tlog.ReadTileData(tlog.Tile{H: layout.TileHeight, L: level, N: int64(n), W: w}, tree)
			if err != nil {
				return nil, err
			}
			got, err := b.Get(ctx, p)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", p, err)
			}
			if string(got) != string(want) {
				return nil, fmt.Errorf("%s: the tile is not the tree's: it was edited", p)
			}
		}
	}
	return res, nil
}

// treeHash is RFC 6962's Merkle tree hash of leaf hashes (the empty
// tree's for none).
func treeHash(leaves []tlog.Hash) tlog.Hash {
	switch len(leaves) {
	case 0:
		return sha256.Sum256(nil)
	case 1:
		return leaves[0]
	}
	k := 1
	for k*2 < len(leaves) {
		k *= 2
	}
	return tlog.NodeHash(treeHash(leaves[:k]), treeHash(leaves[k:]))
}
