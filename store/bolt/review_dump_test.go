package bolt_test

import (
	"bytes"
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/internal/testhsm"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/store/bolt"
)

// slowSink is a backup client that reads slowly: it blocks in the dump
// until released.
type slowSink struct{ release chan struct{} }

func (s slowSink) Meta(string, []byte) error          { <-s.release; return nil }
func (s slowSink) Key(*kms.Key) error                 { return nil }
func (s slowSink) Version(string, *kms.Version) error { return nil }
func (s slowSink) Token(*kms.Token) error             { return nil }
func (s slowSink) AuditRow(uint64, []byte) error      { return nil }
func (s slowSink) AuditEnd(uint64, uint64) error      { return nil }
func (s slowSink) Checkpoint(uint64, []byte) error    { return nil }
func (s slowSink) Pending([][]byte) error             { return nil }

// TestReviewSlowBackupStallsWrites: Dump streams the whole backup to the
// HTTP client inside one bbolt read transaction. While it is open, a
// write that grows the file past its mmap must wait for it to end (bbolt
// remaps under a lock every read transaction holds): a backup read slowly
// (a slow link, a stalled client) stops kmsd's writes.
func TestReviewSlowBackupStallsWrites(t *testing.T) {
	ctx := context.Background()
	st, err := bolt.Open(filepath.Join(t.TempDir(), "kms.db"), bolt.Options{Sealer: testhsm.Open(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if err := st.PutMeta("sealed-under", []byte(`{"id":"x"}`)); err != nil {
		t.Fatal(err)
	}
	sink := slowSink{release: make(chan struct{})}
	dumped := make(chan error, 1)
	go func() { dumped <- st.Dump(ctx, sink) }()
	time.Sleep(200 * time.Millisecond) // the dump holds its read transaction
	wrote := make(chan int, 1)
	go func() {
		big := bytes.Repeat([]byte("x"), 64<<10)
		for i := 0; i < 64; i++ { // 4 MiB: the file grows past its mmap
			if err := st.PutMeta(fmt.Sprintf("review-%d", i), big); err != nil {
				t.Error(err)
				break
			}
			wrote <- i
		}
		close(wrote)
	}()
	n := 0
	timeout := time.After(5 * time.Second)
loop:
	for {
		select {
		case _, ok := <-wrote:
			if !ok {
				break loop
			}
			n++
		case <-timeout:
			break loop
		}
	}
	close(sink.release)
	<-dumped
	if n < 64 {
		t.Errorf("while a backup was being read, only %d of 64 writes finished in 5 s: writes wait for the backup's read transaction", n)
	}
}
