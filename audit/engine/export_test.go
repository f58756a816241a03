package engine

import (
	"os"
	"testing"
	"time"
)

// Hooks for the engine's tests, which run it over the real bbolt store
// (package engine_test: bolt imports engine).

const (
	WALAlign  = walAlign
	WALHeader = walHeader
)

var (
	ErrClosed  = errClosed
	ErrWALGone = errWALGone
)

// SetFlushInterval sets the background flush's period for one test.
func SetFlushInterval(t *testing.T, d time.Duration) {
	old := flushInterval
	flushInterval = d
	t.Cleanup(func() { flushInterval = old })
}

// Waiting is how many rows wait in the journal.
func (l *Log) Waiting() int { return l.waiting() }

// LastFrameOffset is where the newest journal frame not yet flushed starts.
func (l *Log) LastFrameOffset() int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.wal.frames[len(l.wal.frames)-1].off
}

// SwapJournalFile makes the journal write to f and returns the file it
// wrote to.
func (l *Log) SwapJournalFile(f *os.File) *os.File {
	l.mu.Lock()
	defer l.mu.Unlock()
	old := l.wal.f
	l.wal.f = f
	return old
}

// JournalUsesAIO reports whether the journal flushes through native AIO.
func (l *Log) JournalUsesAIO() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.wal.aio != nil
}

// ScanJournal reads a journal file: the records of its valid frames, how
// many valid frames it holds, and its size.
func ScanJournal(path string, size int64) (records, frames int, fileSize int64, err error) {
	w, err := openWAL(path, size)
	if err != nil {
		return 0, 0, 0, err
	}
	defer w.close()
	recs, err := w.scan(0)
	if err != nil {
		return 0, 0, 0, err
	}
	st, err := w.f.Stat()
	if err != nil {
		return 0, 0, 0, err
	}
	return len(recs), len(w.found), st.Size(), nil
}
