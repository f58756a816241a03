// Package layout names the resources of a C2SP tlog-tiles log
// (c2sp.org/tlog-tiles): the checkpoint, the Merkle tree tiles and the
// entry bundles. It is a leaf: the archive writer, kmsd's tile endpoint
// and any reader (kmsctl, a monitor) share these paths and nothing else.
package layout

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

const (
	// TileHeight is the tree levels one tile spans (fixed by the spec).
	TileHeight = 8
	// TileWidth is the hashes in a full tile, and entries in a full
	// bundle.
	TileWidth = 1 << TileHeight
	// HashSize is a tree hash's size (SHA-256).
	HashSize = 32
	// MaxEntry is the largest entry a bundle holds (a uint16 length).
	MaxEntry = 1<<16 - 1
	// CheckpointPath is the signed checkpoint's path.
	CheckpointPath = "checkpoint"
)

// index encodes n as zero-padded 3-digit elements, all but the last
// prefixed with x: 1234067 is x001/x234/067.
func index(n uint64) string {
	s := fmt.Sprintf("%03d", n%1000)
	for n >= 1000 {
		n /= 1000
		s = fmt.Sprintf("x%03d/%s", n%1000, s)
	}
	return s
}

// partial is the ".p/<W>" suffix of a partial tile (width 1-255), or "".
func partial(width int) string {
	if width <= 0 || width >= TileWidth {
		return ""
	}
	return ".p/" + strconv.Itoa(width)
}

// TilePath is the path of tile n at level, of width hashes (TileWidth or
// 0: a full tile).
func TilePath(level int, n uint64, width int) string {
	return "tile/" + strconv.Itoa(level) + "/" + index(n) + partial(width)
}

// EntriesPath is the path of entry bundle n, of width entries (TileWidth
// or 0: a full bundle).
func EntriesPath(n uint64, width int) string {
	return "tile/entries/" + index(n) + partial(width)
}

// PartialWidth is the width of the partial tile at level of a tree of
// size entries (0: there is none).
func PartialWidth(size uint64, level int) int {
	for range level {
		size /= TileWidth
	}
	return int(size % TileWidth)
}

// FullTiles is how many full tiles level has in a tree of size entries.
func FullTiles(size uint64, level int) uint64 {
	for range level + 1 {
		size /= TileWidth
	}
	return size
}

// Resource is a parsed tlog-tiles path.
type Resource struct {
	Checkpoint bool
	Entries    bool // an entry bundle (else a tile at Level)
	Level      int
	N          uint64
	Width      int // 1-255 for a partial resource, TileWidth for a full one
}

// ErrPath is a path that names no tlog-tiles resource.
var ErrPath = errors.New("not a tlog-tiles path")

// Parse checks p against the spec's grammar exactly (levels 0-63, no
// leading zeroes, elements of three digits, widths 1-255) and returns
// what it names; anything else is ErrPath. The result's paths are the
// only ones a server built on it opens, whatever it was asked.
func Parse(p string) (Resource, error) {
	if p == CheckpointPath {
		return Resource{Checkpoint: true}, nil
	}
	rest, ok := strings.CutPrefix(p, "tile/")
	if !ok {
		return Resource{}, ErrPath
	}
	var r Resource
	first, rest, ok := strings.Cut(rest, "/")
	if !ok {
		return Resource{}, ErrPath
	}
	if first == "entries" {
		r.Entries = true
	} else {
		l, err := strconv.Atoi(first)
		if err != nil || l < 0 || l > 63 || strconv.Itoa(l) != first {
			return Resource{}, ErrPath
		}
		r.Level = l
	}
	r.Width = TileWidth
	if i := strings.Index(rest, ".p/"); i >= 0 {
		w := rest[i+3:]
		width, err := strconv.Atoi(w)
		if err != nil || width < 1 || width >= TileWidth || strconv.Itoa(width) != w {
			return Resource{}, ErrPath
		}
		r.Width, rest = width, rest[:i]
	}
	elems := strings.Split(rest, "/")
	if len(elems) > 7 { // 2^64 has 20 digits: seven elements
		return Resource{}, ErrPath
	}
	for i, e := range elems {
		if i < len(elems)-1 {
			var ok bool
			if e, ok = strings.CutPrefix(e, "x"); !ok {
				return Resource{}, ErrPath
			}
		}
		if len(e) != 3 || strings.Trim(e, "0123456789") != "" {
			return Resource{}, ErrPath
		}
		d, _ := strconv.ParseUint(e, 10, 64)
		if r.N > (1<<64-1-d)/1000 {
			return Resource{}, ErrPath
		}
		r.N = r.N*1000 + d
	}
	// One spelling per resource: what Parse accepts is what the writer
	// wrote (no x000/ prefix, say).
	if r.path() != p {
		return Resource{}, ErrPath
	}
	return r, nil
}

// Path is the resource's path.
func (r Resource) path() string {
	switch {
	case r.Checkpoint:
		return CheckpointPath
	case r.Entries:
		return EntriesPath(r.N, r.Width)
	}
	return TilePath(r.Level, r.N, r.Width)
}

// Path is the resource's path.
func (r Resource) Path() string { return r.path() }
