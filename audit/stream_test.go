package audit_test

import (
	"bytes"
	"sync"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/audit"
)

type blockingWriter struct {
	mu      sync.Mutex
	release chan struct{}
	buf     bytes.Buffer
}

func (b *blockingWriter) Write(p []byte) (int, error) {
	<-b.release
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// TestStreamNeverHangs: with a stuck sink, Emit returns within its timeout
// and counts what it dropped; once the sink moves, queued records arrive as
// JSON lines in order.
func TestStreamNeverHangs(t *testing.T) {
	w := &blockingWriter{release: make(chan struct{})}
	s := audit.NewStream(w, 20*time.Millisecond, 2, nil)
	start := time.Now()
	for i := 0; i < 6; i++ {
		s.Emit([]byte{'a' + byte(i)})
	}
	if el := time.Since(start); el > time.Second {
		t.Fatalf("6 emits to a stuck sink took %v", el)
	}
	if d := s.Dropped(); d < 3 || d > 4 {
		t.Fatalf("dropped %d, want 3 or 4 (buffer 2, one in the writer)", d)
	}
	close(w.release)
	s.Close()
	w.mu.Lock()
	got := w.buf.String()
	w.mu.Unlock()
	if got != "a\nb\nc\n" && got != "a\nb\n" {
		t.Fatalf("sink got %q", got)
	}
}
