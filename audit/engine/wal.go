package engine

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"sort"
	"syscall"

	"github.com/kmsd-project/kmsd/internal/fileutil"
)

// The audit write-ahead log: a preallocated file used as a ring of frames,
// each one group of records made durable with a single fdatasync. bbolt
// needs two fdatasyncs per commit (pages, then meta page) and a B+tree
// update; a frame overwrites blocks the file already has, so its
// fdatasync writes data only (no size or extent change, no journal
// commit). Records move from the WAL into bbolt in the background, in
// large transactions (flushAudit), and before any audit read.
//
// Frame layout, starting on a 4 KiB boundary (walAlign):
//
//	magic "kmsdwal1" | first index u64 | count u32 | payload length u32 |
//	CRC-32C u32 of bytes 8..24 and the payload | zero u32 |
//	payload: count × (length u32 | canonical record)
//
// all integers big endian. A frame is valid when its magic and CRC match;
// a torn write fails the CRC. At open, every valid frame holding records
// at or past bbolt's size is copied into bbolt (they must continue the
// log exactly, or Open fails), then every frame found is invalidated
// (reset), so that the file only ever holds frames of the running process.
// Record bytes are JSON, which never holds a NUL byte, so a record cannot
// carry a forged frame header (the index field's high byte is NUL).
const (
	walMagic       = "kmsdwal1"
	walHeader      = 32
	walAlign       = 4096
	DefaultWALSize = 16 << 20
	// walFlushRecords is how many records may wait in the WAL before the
	// background flush moves them into bbolt.
	walFlushRecords = 2048
)

var walCRC = crc32.MakeTable(crc32.Castagnoli)

type wal struct {
	f        *os.File
	path     string
	dev, ino uint64  // of the file opened, to notice it replaced or unlinked
	found    []int64 // offsets of the valid frames scan saw
	aio      *asyncSyncer
	size     int64
	head     int64      // where the next frame goes
	frames   []walFrame // frames not yet in bbolt, oldest first
	used     int64      // bytes of those frames
	buf      []byte
}

type walFrame struct {
	off, n int64
	end    uint64 // index after its last record
}

func alignUp(n int64) int64 { return (n + walAlign - 1) &^ (walAlign - 1) }

// openWAL opens (creating) the file.
func openWAL(path string, size int64) (*wal, error) {
	if size < 4*walAlign {
		return nil, fmt.Errorf("audit WAL size %d is below %d bytes", size, 4*walAlign)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	w := &wal{f: f, path: path, size: alignUp(size)}
	if st, err := f.Stat(); err == nil {
		if sys, ok := st.Sys().(*syscall.Stat_t); ok {
			w.dev, w.ino = uint64(sys.Dev), uint64(sys.Ino)
		}
	}
	// Where the kernel has no native AIO (or its limit is reached) the WAL
	// uses a plain fdatasync: slower under load, as durable.
	w.aio, _ = newAsyncSyncer()
	return w, nil
}

// sync makes what was written durable: through native AIO when it is
// available, else a blocking fdatasync. If AIO refuses the request itself
// (not the flush), the WAL stops using it.
func (w *wal) sync() error {
	if w.aio != nil {
		err := w.aio.fdatasync(w.f)
		if !errors.Is(err, errAIOUnsupported) {
			return err
		}
		w.aio.close()
		w.aio = nil
	}
	return fdatasync(w.f)
}

// replaced reports whether the file at the WAL's path is no longer the one
// opened (deleted, renamed away or replaced): records written to it would
// not be found after a crash.
func (w *wal) replaced() bool {
	st, err := os.Stat(w.path)
	if err != nil {
		return true
	}
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok {
		return false
	}
	if uint64(sys.Dev) != w.dev || uint64(sys.Ino) != w.ino {
		return true
	}
	fst, err := w.f.Stat()
	if err != nil {
		return true
	}
	fsys, ok := fst.Sys().(*syscall.Stat_t)
	return ok && fsys.Nlink == 0
}

func (w *wal) close() error {
	if w.aio != nil {
		w.aio.close()
	}
	return w.f.Close()
}

type scannedFrame struct {
	first uint64
	recs  [][]byte
}

// scan reads every valid frame and returns the records from index from on,
// in order, as far as frames continue each other without a gap.
func (w *wal) scan(from uint64) ([][]byte, error) {
	st, err := w.f.Stat()
	if err != nil {
		return nil, err
	}
	var frames []scannedFrame
	hdr := make([]byte, walHeader)
	for off := int64(0); off+walHeader <= st.Size(); {
		if _, err := w.f.ReadAt(hdr, off); err != nil {
			return nil, err
		}
		if string(hdr[:8]) != walMagic {
			off += walAlign
			continue
		}
		first := binary.BigEndian.Uint64(hdr[8:])
		count := binary.BigEndian.Uint32(hdr[16:])
		plen := int64(binary.BigEndian.Uint32(hdr[20:]))
		if off+walHeader+plen > st.Size() {
			off += walAlign
			continue
		}
		payload := make([]byte, plen)
		if _, err := w.f.ReadAt(payload, off+walHeader); err != nil && !errors.Is(err, io.EOF) {
			return nil, err
		}
		crc := crc32.Update(crc32.Checksum(hdr[8:24], walCRC), walCRC, payload)
		recs, ok := splitPayload(payload, count)
		if crc != binary.BigEndian.Uint32(hdr[24:]) || !ok {
			off += walAlign // torn or stale: skip this block only
			continue
		}
		w.found = append(w.found, off)
		if first+uint64(count) > from {
			frames = append(frames, scannedFrame{first, recs})
		}
		off += alignUp(walHeader + plen)
	}
	sort.Slice(frames, func(i, j int) bool { return frames[i].first < frames[j].first })
	var out [][]byte
	next := from
	for _, fr := range frames {
		if fr.first > next {
			break // a gap: nothing after it can have been acknowledged
		}
		if skip := next - fr.first; skip < uint64(len(fr.recs)) {
			out = append(out, fr.recs[skip:]...)
			next = fr.first + uint64(len(fr.recs))
		}
	}
	return out, nil
}

func splitPayload(p []byte, count uint32) ([][]byte, bool) {
	recs := make([][]byte, 0, count)
	for len(p) >= 4 {
		n := int(binary.BigEndian.Uint32(p))
		if n == 0 || len(p) < 4+n {
			return nil, false
		}
		recs = append(recs, p[4:4+n])
		p = p[4+n:]
	}
	return recs, len(p) == 0 && len(recs) == int(count)
}

// reset empties the WAL after its records reached bbolt: a file of another
// size is rewritten with zeros (the first open, or a new --audit-wal-mib),
// otherwise the first block of every frame scan found is zeroed, which
// invalidates it. Then the file is made durable.
func (w *wal) reset() error {
	st, err := w.f.Stat()
	if err != nil {
		return err
	}
	zero := make([]byte, 1<<20)
	if st.Size() != w.size {
		if err := w.f.Truncate(0); err != nil {
			return err
		}
		for off := int64(0); off < w.size; off += int64(len(zero)) {
			n := min(int64(len(zero)), w.size-off)
			if _, err := w.f.WriteAt(zero[:n], off); err != nil {
				return err
			}
		}
	} else {
		for _, off := range w.found {
			if _, err := w.f.WriteAt(zero[:walAlign], off); err != nil {
				return err
			}
		}
	}
	if err := w.f.Sync(); err != nil {
		return err
	}
	if st.Size() != w.size { // a new file: its directory entry must last too
		if err := fileutil.SyncDir(filepath.Dir(w.f.Name())); err != nil {
			return err
		}
	}
	w.head, w.frames, w.used, w.found = 0, nil, 0, nil
	return nil
}

// encode builds the frame for records first.. in w.buf.
func (w *wal) encode(first uint64, recs [][]byte) []byte {
	b := append(w.buf[:0], walMagic...)
	b = binary.BigEndian.AppendUint64(b, first)
	b = binary.BigEndian.AppendUint32(b, uint32(len(recs)))
	b = binary.BigEndian.AppendUint32(b, 0) // payload length, below
	b = append(b, make([]byte, 8)...)       // CRC and zero
	for _, r := range recs {
		b = binary.BigEndian.AppendUint32(b, uint32(len(r)))
		b = append(b, r...)
	}
	binary.BigEndian.PutUint32(b[20:], uint32(len(b)-walHeader))
	crc := crc32.Update(crc32.Checksum(b[8:24], walCRC), walCRC, b[walHeader:])
	binary.BigEndian.PutUint32(b[24:], crc)
	// Pad to the block size so the next frame starts on a boundary and
	// each write covers whole blocks.
	b = append(b, make([]byte, alignUp(int64(len(b)))-int64(len(b)))...)
	w.buf = b
	return b
}

// place returns where a frame of n bytes can go without overwriting a
// frame still waiting for bbolt, or false if the ring has no room.
func (w *wal) place(n int64) (int64, bool) {
	if n > w.size {
		return 0, false
	}
	if len(w.frames) == 0 {
		if w.head+n > w.size {
			return 0, true
		}
		return w.head, true
	}
	tail := w.frames[0].off
	if w.head > tail { // waiting frames are [tail, head): free at the end, then the start
		if w.head+n <= w.size {
			return w.head, true
		}
		if n <= tail {
			return 0, true
		}
		return 0, false
	}
	if w.head+n <= tail { // wrapped: waiting frames are [tail, size) and [0, head)
		return w.head, true
	}
	return 0, false
}

// write writes a frame at off and makes it durable with one fdatasync.
func (w *wal) write(frame []byte, off int64, end uint64) error {
	if _, err := w.f.WriteAt(frame, off); err != nil {
		return err
	}
	if err := w.sync(); err != nil {
		return err
	}
	w.frames = append(w.frames, walFrame{off: off, n: int64(len(frame)), end: end})
	w.used += int64(len(frame))
	w.head = off + int64(len(frame))
	return nil
}

// invalidate zeroes the first block of a frame that may be half written,
// best effort (the caller already refuses the frame's records).
func (w *wal) invalidate(off int64) {
	if _, err := w.f.WriteAt(make([]byte, walAlign), off); err == nil {
		_ = fdatasync(w.f)
	}
}

// flushed forgets the frames whose records are all below end (in bbolt).
func (w *wal) flushed(end uint64) {
	i := 0
	for i < len(w.frames) && w.frames[i].end <= end {
		w.used -= w.frames[i].n
		i++
	}
	w.frames = w.frames[i:]
}
