package engine_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/audit/engine"
	"github.com/kmsd-project/kmsd/internal/testhsm"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/store/bolt"
	"github.com/kmsd-project/kmsd/store/storetest"
)

var ctx = context.Background()

func testRec(op string) *kms.AuditRecord {
	return &kms.AuditRecord{Time: "2026-01-01T00:00:00Z", Actor: "t", Operation: op, Status: 200}
}

// noBackgroundFlush keeps records in the WAL for the length of a test, as
// they are between two flushes.
func noBackgroundFlush(t *testing.T) { engine.SetFlushInterval(t, 1<<40) }

func openTest(t *testing.T, path string, walSize int64) *bolt.Store {
	t.Helper()
	s, err := bolt.Open(path, bolt.Options{Sealer: testhsm.Open(t), AuditWALSize: walSize})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	in, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.Create(to)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	out.Close()
}

// crashCopy copies the database and its WAL as a crash would leave them:
// what was written so far, without Close's final flush.
func crashCopy(t *testing.T, s *bolt.Store) string {
	t.Helper()
	dir := t.TempDir()
	to := filepath.Join(dir, "kms.db")
	copyFile(t, s.Path(), to)
	copyFile(t, s.Path()+"-audit-wal", to+"-audit-wal")
	return to
}

// verifyLog checks the stored log (storetest.CheckLog) and that it holds
// the operations want, in order.
func verifyLog(t *testing.T, s *bolt.Store, want []string) {
	t.Helper()
	if got := storetest.CheckLog(t, s.Audit()); !slices.Equal(got, want) {
		t.Fatalf("the log holds %d records %q, want %d %q", len(got), got, len(want), want)
	}
}

// TestWALRecoversAcknowledgedRecords: records acknowledged from the WAL
// but not yet in bbolt when the process dies are in the log after the next
// open, in order, with a consistent tree; the WAL is zeroed after.
func TestWALRecoversAcknowledgedRecords(t *testing.T) {
	noBackgroundFlush(t)
	s := openTest(t, filepath.Join(t.TempDir(), "kms.db"), 0)
	var want []string
	for i := 0; i < 3; i++ { // three into bbolt through a state change
		want = append(want, fmt.Sprint("early", i))
		if err := s.Audit().AppendAudit(ctx, testRec(want[i])); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.CreateKey(ctx, &kms.Key{Name: "k", Kind: "ml-dsa-65", Primary: 1, Latest: 1}, &kms.Version{Number: 1}, []*kms.AuditRecord{testRec("create")}); err != nil {
		t.Fatal(err)
	}
	want = append(want, "create")
	var wg sync.WaitGroup
	for i := 0; i < 100; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := s.Audit().AppendAudit(ctx, testRec("late")); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	for range 100 {
		want = append(want, "late")
	}
	if s.Audit().JournalSyncs() == 0 || s.Audit().Waiting() != 100 {
		t.Fatalf("%d WAL syncs, %d records waiting: the test does not exercise the WAL", s.Audit().JournalSyncs(), s.Audit().Waiting())
	}
	path := crashCopy(t, s)
	r := openTest(t, path, 0)
	verifyLog(t, r, want)
	if _, err := r.GetKey(ctx, "k"); err != nil {
		t.Fatal(err)
	}
	// Recovered records are in bbolt and the WAL holds none: a third open
	// from a crash copy of the second finds the same log.
	verifyLog(t, openTest(t, crashCopy(t, r), 0), want)
}

// TestWALTornFrame: a frame whose bytes did not all reach the disk fails
// its CRC; the records before it are recovered and the log stays valid.
func TestWALTornFrame(t *testing.T) {
	noBackgroundFlush(t)
	s := openTest(t, filepath.Join(t.TempDir(), "kms.db"), 0)
	var want []string
	for i := 0; i < 5; i++ {
		want = append(want, fmt.Sprint("r", i))
		if err := s.Audit().AppendAudit(ctx, testRec(want[i])); err != nil {
			t.Fatal(err)
		}
	}
	lastOff := s.Audit().LastFrameOffset()
	path := crashCopy(t, s)
	f, err := os.OpenFile(path+"-audit-wal", os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 1)
	f.ReadAt(b, lastOff+engine.WALHeader+10)
	b[0] ^= 0x40
	f.WriteAt(b, lastOff+engine.WALHeader+10)
	f.Close()
	verifyLog(t, openTest(t, path, 0), want[:4])
}

// TestWALOfAnotherLogRefused: a WAL that does not continue the database's
// log (restored from elsewhere) stops Open with a clear error instead of
// grafting foreign records.
func TestWALOfAnotherLogRefused(t *testing.T) {
	noBackgroundFlush(t)
	a := openTest(t, filepath.Join(t.TempDir(), "kms.db"), 0)
	b := openTest(t, filepath.Join(t.TempDir(), "kms.db"), 0)
	for _, s := range []*bolt.Store{a, b} {
		if err := s.Audit().AppendAudit(ctx, testRec("first")); err != nil {
			t.Fatal(err)
		}
		if err := s.CreateKey(ctx, &kms.Key{Name: "k", Kind: "ml-dsa-65", Primary: 1, Latest: 1}, &kms.Version{Number: 1}, []*kms.AuditRecord{{Time: "2026-01-01T00:00:00Z", Actor: fmt.Sprintf("%p", s), Operation: "create", Status: 201}}); err != nil {
			t.Fatal(err)
		}
		if err := s.Audit().AppendAudit(ctx, testRec("waiting")); err != nil {
			t.Fatal(err)
		}
	}
	path := crashCopy(t, a)
	copyFile(t, b.Path()+"-audit-wal", path+"-audit-wal")
	_, err := bolt.Open(path, bolt.Options{Sealer: testhsm.Open(t)})
	if err == nil || !strings.Contains(err.Error(), "does not continue the log") {
		t.Fatalf("Open with a foreign WAL: %v", err)
	}
}

// TestWALRingWrapsAndFills: a WAL of four frames wraps around while the
// background flush moves records into bbolt, and when it is full a group
// waits for a synchronous flush instead of overwriting waiting records.
func TestWALRingWrapsAndFills(t *testing.T) {
	noBackgroundFlush(t)
	s := openTest(t, filepath.Join(t.TempDir(), "kms.db"), 4*engine.WALAlign)
	var want []string
	for i := 0; i < 30; i++ { // one frame each: the ring fills every 4
		want = append(want, fmt.Sprint("r", i))
		if err := s.Audit().AppendAudit(ctx, testRec(want[i])); err != nil {
			t.Fatal(err)
		}
	}
	if s.Commits() < 6 {
		t.Fatalf("%d bbolt commits: the full ring was not flushed", s.Commits())
	}
	path := crashCopy(t, s)
	verifyLog(t, s, want)
	verifyLog(t, openTest(t, path, 4*engine.WALAlign), want)
}

// TestWALWriteFailureFallsBackToBbolt: when a WAL write fails, that group
// is refused (nothing acknowledged), and later groups go through bbolt
// commits, the first with the same indexes.
func TestWALWriteFailureFallsBackToBbolt(t *testing.T) {
	noBackgroundFlush(t)
	path := filepath.Join(t.TempDir(), "kms.db")
	s := openTest(t, path, 0)
	if err := s.Audit().AppendAudit(ctx, testRec("a")); err != nil {
		t.Fatal(err)
	}
	bad, _ := os.Open(path + "-audit-wal") // read-only: writes fail
	good := s.Audit().SwapJournalFile(bad)
	failed := testRec("refused")
	if err := s.Audit().AppendAudit(ctx, failed); err == nil || failed.Committed {
		t.Fatalf("a failed WAL write was acknowledged: %v", err)
	}
	s.Audit().SwapJournalFile(good)
	bad.Close()
	commits := s.Commits()
	if err := s.Audit().AppendAudit(ctx, testRec("b")); err != nil {
		t.Fatal(err)
	}
	if s.Commits() != commits+1 {
		t.Fatal("the group after a WAL failure did not go through bbolt")
	}
	syncs := s.Audit().JournalSyncs()
	if err := s.Audit().AppendAudit(ctx, testRec("c")); err != nil {
		t.Fatal(err)
	}
	if s.Audit().JournalSyncs() != syncs || s.Commits() != commits+2 {
		t.Fatal("a group went to the WAL after it failed")
	}
	verifyLog(t, openTest(t, crashCopy(t, s), 0), []string{"a", "b", "c"})
}

// TestWALFrameLargerThanTheWAL: a group too big for the whole WAL commits
// through bbolt instead of failing.
func TestWALFrameLargerThanTheWAL(t *testing.T) {
	noBackgroundFlush(t)
	s := openTest(t, filepath.Join(t.TempDir(), "kms.db"), 4*engine.WALAlign)
	big := testRec(strings.Repeat("x", 5*engine.WALAlign))
	commits := s.Commits()
	if err := s.Audit().AppendAudit(ctx, big); err != nil || !big.Committed {
		t.Fatalf("a group larger than the WAL: %v", err)
	}
	if s.Commits() != commits+1 {
		t.Fatal("it did not go through bbolt")
	}
	if err := s.Audit().AppendAudit(ctx, testRec("small")); err != nil {
		t.Fatal(err)
	}
	verifyLog(t, openTest(t, crashCopy(t, s), 4*engine.WALAlign), []string{big.Operation, "small"})
}

// TestWALInvalidatedAtOpen: after an open, the WAL holds no valid frame
// (old ones cannot come back at a later recovery) and has its full size.
func TestWALInvalidatedAtOpen(t *testing.T) {
	noBackgroundFlush(t)
	path := filepath.Join(t.TempDir(), "kms.db")
	s, err := bolt.Open(path, bolt.Options{Sealer: testhsm.Open(t), AuditWALSize: 64 * engine.WALAlign})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 20; i++ {
		if err := s.Audit().AppendAudit(ctx, testRec("r")); err != nil {
			t.Fatal(err)
		}
	}
	if recs, _, _, err := engine.ScanJournal(path+"-audit-wal", 64*engine.WALAlign); err != nil || recs != 20 {
		t.Fatalf("%d records in the WAL before close (%v), want 20", recs, err)
	}
	s.Close()
	s = openTest(t, path, 64*engine.WALAlign)
	recs, frames, size, err := engine.ScanJournal(path+"-audit-wal", 64*engine.WALAlign)
	if err != nil || recs != 0 || frames != 0 {
		t.Fatalf("%d frames still valid after open (%v)", frames, err)
	}
	if size != 64*engine.WALAlign {
		t.Fatalf("WAL is %d bytes, want %d", size, 64*engine.WALAlign)
	}
	verifyLog(t, s, slicesRepeat("r", 20))
}

func slicesRepeat(s string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = s
	}
	return out
}

// TestAppendDuringCloseNeverHangs: appends racing with Close all return,
// each either committed or refused with the store closed.
func TestAppendDuringCloseNeverHangs(t *testing.T) {
	for round := 0; round < 20; round++ {
		s, err := bolt.Open(filepath.Join(t.TempDir(), "kms.db"), bolt.Options{Sealer: testhsm.Open(t), AuditWALSize: 64 * engine.WALAlign})
		if err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		errs := make(chan error, 64)
		for i := 0; i < 64; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				r := testRec("r")
				err := s.Audit().AppendAudit(ctx, r)
				if (err == nil) != r.Committed {
					err = fmt.Errorf("returned %v with Committed %v", err, r.Committed)
				} else if err != nil && err != engine.ErrClosed {
					err = fmt.Errorf("unexpected: %w", err)
				} else {
					err = nil
				}
				errs <- err
			}()
		}
		s.Close()
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("an append hangs after Close")
		}
		close(errs)
		for err := range errs {
			if err != nil {
				t.Fatal(err)
			}
		}
	}
}

// TestWALDeletedWhileRunning is the review's finding: the WAL deleted while
// kmsd ran, then a crash, lost the records of answered requests, and kmsd
// restarted without a word. Now the group written into the orphaned file is
// refused, every record acknowledged earlier moves into bbolt, a new WAL
// file is made, and a crash afterwards loses nothing acknowledged.
func TestWALDeletedWhileRunning(t *testing.T) {
	noBackgroundFlush(t)
	for _, how := range []string{"unlinked", "replaced"} {
		t.Run(how, func(t *testing.T) {
			s := openTest(t, filepath.Join(t.TempDir(), "kms.db"), 0)
			var want []string
			for i := 0; i < 20; i++ {
				want = append(want, fmt.Sprint("before", i))
				if err := s.Audit().AppendAudit(ctx, testRec(want[i])); err != nil {
					t.Fatal(err)
				}
			}
			if s.Audit().Waiting() != 20 {
				t.Fatalf("%d records in the WAL only: the test does not exercise the WAL", s.Audit().Waiting())
			}
			walPath := s.Path() + "-audit-wal"
			old, _ := os.Stat(walPath)
			switch how {
			case "unlinked":
				os.Remove(walPath)
			case "replaced":
				os.Remove(walPath)
				os.WriteFile(walPath, make([]byte, 1<<20), 0o600)
			}
			// The first group after it went to a file nobody will read:
			// refused, fail-closed.
			if err := s.Audit().AppendAudit(ctx, testRec("lost")); !errors.Is(err, engine.ErrWALGone) {
				t.Fatalf("append into the orphaned WAL: %v", err)
			}
			if s.Audit().Waiting() != 0 || s.Audit().JournalRecreated() != 1 {
				t.Fatalf("after detection: %d waiting, %d re-created", s.Audit().Waiting(), s.Audit().JournalRecreated())
			}
			now, err := os.Stat(walPath)
			if err != nil || os.SameFile(old, now) {
				t.Fatalf("the WAL was not re-created: %v", err)
			}
			for i := 0; i < 5; i++ {
				want = append(want, fmt.Sprint("after", i))
				if err := s.Audit().AppendAudit(ctx, testRec(want[len(want)-1])); err != nil {
					t.Fatal(err)
				}
			}
			if s.Audit().Waiting() != 5 {
				t.Fatalf("%d records in the new WAL, want 5", s.Audit().Waiting())
			}
			verifyLog(t, openTest(t, crashCopy(t, s), 0), want)
		})
	}
}

// TestWALDeletedWhileIdle: the background check finds a deleted WAL
// without waiting for the next record, and moves what waits into bbolt.
func TestWALDeletedWhileIdle(t *testing.T) {
	engine.SetFlushInterval(t, 20*time.Millisecond) // restored after the stores' cleanups stop their flushers
	s := openTest(t, filepath.Join(t.TempDir(), "kms.db"), 0)
	// A burst keeps records waiting: the flush takes them only on a tick.
	if err := s.Audit().AppendAudit(ctx, testRec("a")); err != nil {
		t.Fatal(err)
	}
	os.Remove(s.Path() + "-audit-wal")
	deadline := time.Now().Add(5 * time.Second)
	for s.Audit().JournalRecreated() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the deleted WAL was not noticed")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, err := os.Stat(s.Path() + "-audit-wal"); err != nil {
		t.Fatal(err)
	}
	verifyLog(t, openTest(t, crashCopy(t, s), 0), []string{"a"})
}

// TestWALMissingAtOpenReported: a database with records whose WAL file is
// gone says so at open.
func TestWALMissingAtOpenReported(t *testing.T) {
	path := filepath.Join(t.TempDir(), "kms.db")
	s, err := bolt.Open(path, bolt.Options{Sealer: testhsm.Open(t)})
	if err != nil {
		t.Fatal(err)
	}
	if s.Audit().JournalMissing() {
		t.Fatal("a new database reports a missing WAL")
	}
	s.Audit().AppendAudit(ctx, testRec("a"))
	s.Close()
	os.Remove(path + "-audit-wal")
	s = openTest(t, path, 0)
	if !s.Audit().JournalMissing() {
		t.Fatal("a missing WAL was not reported")
	}
}

// TestReopenAtEverySize: a log reopened at any size (the engine reloads the
// last complete subtree of each level from the rows) goes on with a tree
// that matches its records.
func TestReopenAtEverySize(t *testing.T) {
	path := filepath.Join(t.TempDir(), "kms.db")
	var want []string
	for n := 0; n < 40; n++ {
		s, err := bolt.Open(path, bolt.Options{Sealer: testhsm.Open(t), AuditWALSize: 64 * engine.WALAlign})
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i <= n%3; i++ {
			want = append(want, fmt.Sprint("r", len(want)))
			if err := s.Audit().AppendAudit(ctx, testRec(want[len(want)-1])); err != nil {
				t.Fatal(err)
			}
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
	}
	verifyLog(t, openTest(t, path, 64*engine.WALAlign), want)
}

func TestMain(m *testing.M) { testhsm.Main(m) }
