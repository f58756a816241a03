package bolt

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/mod/sumdb/tlog"

	"github.com/kmsd-project/kmsd/kms"
)

var ctx = context.Background()

func testRec(op string) *kms.AuditRecord {
	return &kms.AuditRecord{Time: "2026-01-01T00:00:00Z", Actor: "t", Operation: op, Status: 200}
}

// noBackgroundFlush keeps records in the WAL for the length of a test, as
// they are between two flushes.
func noBackgroundFlush(t *testing.T) {
	old := flushInterval
	flushInterval = 1 << 40
	t.Cleanup(func() { flushInterval = old })
}

func openTest(t *testing.T, path string, walSize int64) *Store {
	t.Helper()
	s, err := Open(path, Options{AuditWALSize: walSize})
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
func crashCopy(t *testing.T, s *Store) string {
	t.Helper()
	dir := t.TempDir()
	to := filepath.Join(dir, "kms.db")
	copyFile(t, s.db.Path(), to)
	copyFile(t, s.db.Path()+"-audit-wal", to+"-audit-wal")
	return to
}

// verifyLog checks the stored log: indexes and prev hashes chain, and the
// tree hash from the stored hashes equals the one recomputed from the
// records alone.
func verifyLog(t *testing.T, s *Store, want []string) {
	t.Helper()
	n, err := s.AuditSize(ctx)
	if err != nil || n != uint64(len(want)) {
		t.Fatalf("size %d (%v), want %d", n, err, len(want))
	}
	recs, err := s.AuditRecords(ctx, 0, n)
	if err != nil {
		t.Fatal(err)
	}
	var leaves []tlog.Hash
	for i, data := range recs {
		r, err := kms.DecodeAuditRecord(data)
		if err != nil {
			t.Fatal(err)
		}
		prev := ""
		if i > 0 {
			prev = hex.EncodeToString(leaves[i-1][:])
		}
		if r.Index != uint64(i) || r.PrevHash != prev || r.Operation != want[i] {
			t.Fatalf("record %d: index %d op %q prev %q, want op %q prev %q", i, r.Index, r.Operation, r.PrevHash, want[i], prev)
		}
		leaves = append(leaves, tlog.RecordHash(data))
	}
	stored, err := tlog.TreeHash(int64(n), tlog.HashReaderFunc(func(idx []int64) ([]tlog.Hash, error) {
		hs, err := s.AuditHashes(ctx, idx)
		out := make([]tlog.Hash, len(hs))
		for i, h := range hs {
			out[i] = h
		}
		return out, err
	}))
	if err != nil {
		t.Fatal(err)
	}
	if recomputed := rootOf(leaves); stored != recomputed {
		t.Fatal("the stored tree hashes do not match the records")
	}
}

// rootOf is RFC 6962's Merkle tree hash, computed directly.
func rootOf(l []tlog.Hash) tlog.Hash {
	if len(l) == 1 {
		return l[0]
	}
	k := 1
	for k*2 < len(l) {
		k *= 2
	}
	return tlog.NodeHash(rootOf(l[:k]), rootOf(l[k:]))
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
		if err := s.AppendAudit(ctx, testRec(want[i])); err != nil {
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
			if err := s.AppendAudit(ctx, testRec("late")); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	for range 100 {
		want = append(want, "late")
	}
	if s.WALSyncs() == 0 || len(s.pending) != 100 {
		t.Fatalf("%d WAL syncs, %d records waiting: the test does not exercise the WAL", s.WALSyncs(), len(s.pending))
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
		if err := s.AppendAudit(ctx, testRec(want[i])); err != nil {
			t.Fatal(err)
		}
	}
	last := s.wal.frames[len(s.wal.frames)-1]
	path := crashCopy(t, s)
	f, err := os.OpenFile(path+"-audit-wal", os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 1)
	f.ReadAt(b, last.off+walHeader+10)
	b[0] ^= 0x40
	f.WriteAt(b, last.off+walHeader+10)
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
	for _, s := range []*Store{a, b} {
		if err := s.AppendAudit(ctx, testRec("first")); err != nil {
			t.Fatal(err)
		}
		if err := s.CreateKey(ctx, &kms.Key{Name: "k", Kind: "ml-dsa-65", Primary: 1, Latest: 1}, &kms.Version{Number: 1}, []*kms.AuditRecord{{Time: "2026-01-01T00:00:00Z", Actor: fmt.Sprintf("%p", s), Operation: "create", Status: 201}}); err != nil {
			t.Fatal(err)
		}
		if err := s.AppendAudit(ctx, testRec("waiting")); err != nil {
			t.Fatal(err)
		}
	}
	path := crashCopy(t, a)
	copyFile(t, b.db.Path()+"-audit-wal", path+"-audit-wal")
	_, err := Open(path, Options{})
	if err == nil || !strings.Contains(err.Error(), "does not continue the log") {
		t.Fatalf("Open with a foreign WAL: %v", err)
	}
}

// TestWALRingWrapsAndFills: a WAL of four frames wraps around while the
// background flush moves records into bbolt, and when it is full a group
// waits for a synchronous flush instead of overwriting waiting records.
func TestWALRingWrapsAndFills(t *testing.T) {
	noBackgroundFlush(t)
	s := openTest(t, filepath.Join(t.TempDir(), "kms.db"), 4*walAlign)
	var want []string
	for i := 0; i < 30; i++ { // one frame each: the ring fills every 4
		want = append(want, fmt.Sprint("r", i))
		if err := s.AppendAudit(ctx, testRec(want[i])); err != nil {
			t.Fatal(err)
		}
	}
	if s.Commits() < 6 {
		t.Fatalf("%d bbolt commits: the full ring was not flushed", s.Commits())
	}
	path := crashCopy(t, s)
	verifyLog(t, s, want)
	verifyLog(t, openTest(t, path, 4*walAlign), want)
}

// TestWALWriteFailureFallsBackToBbolt: when a WAL write fails, that group
// is refused (nothing acknowledged), and later groups go through bbolt
// commits, the first with the same indexes.
func TestWALWriteFailureFallsBackToBbolt(t *testing.T) {
	noBackgroundFlush(t)
	path := filepath.Join(t.TempDir(), "kms.db")
	s := openTest(t, path, 0)
	if err := s.AppendAudit(ctx, testRec("a")); err != nil {
		t.Fatal(err)
	}
	good := s.wal.f
	bad, _ := os.Open(path + "-audit-wal") // read-only: writes fail
	s.auditMu.Lock()
	s.wal.f = bad
	s.auditMu.Unlock()
	failed := testRec("refused")
	if err := s.AppendAudit(ctx, failed); err == nil || failed.Committed {
		t.Fatalf("a failed WAL write was acknowledged: %v", err)
	}
	s.auditMu.Lock()
	s.wal.f = good
	s.auditMu.Unlock()
	bad.Close()
	commits := s.Commits()
	if err := s.AppendAudit(ctx, testRec("b")); err != nil {
		t.Fatal(err)
	}
	if s.Commits() != commits+1 {
		t.Fatal("the group after a WAL failure did not go through bbolt")
	}
	syncs := s.WALSyncs()
	if err := s.AppendAudit(ctx, testRec("c")); err != nil {
		t.Fatal(err)
	}
	if s.WALSyncs() != syncs || s.Commits() != commits+2 {
		t.Fatal("a group went to the WAL after it failed")
	}
	verifyLog(t, openTest(t, crashCopy(t, s), 0), []string{"a", "b", "c"})
}

// TestWALFrameLargerThanTheWAL: a group too big for the whole WAL commits
// through bbolt instead of failing.
func TestWALFrameLargerThanTheWAL(t *testing.T) {
	noBackgroundFlush(t)
	s := openTest(t, filepath.Join(t.TempDir(), "kms.db"), 4*walAlign)
	big := testRec(strings.Repeat("x", 5*walAlign))
	commits := s.Commits()
	if err := s.AppendAudit(ctx, big); err != nil || !big.Committed {
		t.Fatalf("a group larger than the WAL: %v", err)
	}
	if s.Commits() != commits+1 {
		t.Fatal("it did not go through bbolt")
	}
	if err := s.AppendAudit(ctx, testRec("small")); err != nil {
		t.Fatal(err)
	}
	verifyLog(t, openTest(t, crashCopy(t, s), 4*walAlign), []string{big.Operation, "small"})
}

// TestWALInvalidatedAtOpen: after an open, the WAL holds no valid frame
// (old ones cannot come back at a later recovery) and has its full size.
func TestWALInvalidatedAtOpen(t *testing.T) {
	noBackgroundFlush(t)
	path := filepath.Join(t.TempDir(), "kms.db")
	s, err := Open(path, Options{AuditWALSize: 64 * walAlign})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 20; i++ {
		if err := s.AppendAudit(ctx, testRec("r")); err != nil {
			t.Fatal(err)
		}
	}
	w, _ := openWAL(path+"-audit-wal", 64*walAlign)
	if recs, _ := w.scan(0); len(recs) != 20 {
		t.Fatalf("%d records in the WAL before close, want 20", len(recs))
	}
	w.f.Close()
	s.Close()
	s = openTest(t, path, 64*walAlign)
	w, _ = openWAL(path+"-audit-wal", 64*walAlign)
	defer w.f.Close()
	if recs, _ := w.scan(0); len(recs) != 0 || len(w.found) != 0 {
		t.Fatalf("%d frames still valid after open", len(w.found))
	}
	if st, _ := w.f.Stat(); st.Size() != 64*walAlign {
		t.Fatalf("WAL is %d bytes, want %d", st.Size(), 64*walAlign)
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
		s, err := Open(filepath.Join(t.TempDir(), "kms.db"), Options{AuditWALSize: 64 * walAlign})
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
				err := s.AppendAudit(ctx, r)
				if (err == nil) != r.Committed {
					err = fmt.Errorf("returned %v with Committed %v", err, r.Committed)
				} else if err != nil && err != errStoreClosed {
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
				if err := s.AppendAudit(ctx, testRec(want[i])); err != nil {
					t.Fatal(err)
				}
			}
			if len(s.pending) != 20 {
				t.Fatalf("%d records in the WAL only: the test does not exercise the WAL", len(s.pending))
			}
			walPath := s.db.Path() + "-audit-wal"
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
			if err := s.AppendAudit(ctx, testRec("lost")); !errors.Is(err, errWALGone) {
				t.Fatalf("append into the orphaned WAL: %v", err)
			}
			if len(s.pending) != 0 || s.WALRecreated() != 1 {
				t.Fatalf("after detection: %d waiting, %d re-created", len(s.pending), s.WALRecreated())
			}
			now, err := os.Stat(walPath)
			if err != nil || os.SameFile(old, now) {
				t.Fatalf("the WAL was not re-created: %v", err)
			}
			for i := 0; i < 5; i++ {
				want = append(want, fmt.Sprint("after", i))
				if err := s.AppendAudit(ctx, testRec(want[len(want)-1])); err != nil {
					t.Fatal(err)
				}
			}
			if len(s.pending) != 5 {
				t.Fatalf("%d records in the new WAL, want 5", len(s.pending))
			}
			verifyLog(t, openTest(t, crashCopy(t, s), 0), want)
		})
	}
}

// TestWALDeletedWhileIdle: the background check finds a deleted WAL
// without waiting for the next record, and moves what waits into bbolt.
func TestWALDeletedWhileIdle(t *testing.T) {
	old := flushInterval
	flushInterval = 20 * time.Millisecond
	t.Cleanup(func() { flushInterval = old }) // after the stores' cleanups stop their flushers
	s := openTest(t, filepath.Join(t.TempDir(), "kms.db"), 0)
	// A burst keeps records waiting: the flush takes them only on a tick.
	if err := s.AppendAudit(ctx, testRec("a")); err != nil {
		t.Fatal(err)
	}
	os.Remove(s.db.Path() + "-audit-wal")
	deadline := time.Now().Add(5 * time.Second)
	for s.WALRecreated() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the deleted WAL was not noticed")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, err := os.Stat(s.db.Path() + "-audit-wal"); err != nil {
		t.Fatal(err)
	}
	verifyLog(t, openTest(t, crashCopy(t, s), 0), []string{"a"})
}

// TestWALMissingAtOpenReported: a database with records whose WAL file is
// gone says so at open.
func TestWALMissingAtOpenReported(t *testing.T) {
	path := filepath.Join(t.TempDir(), "kms.db")
	s, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if s.WALMissing() {
		t.Fatal("a new database reports a missing WAL")
	}
	s.AppendAudit(ctx, testRec("a"))
	s.Close()
	os.Remove(path + "-audit-wal")
	s = openTest(t, path, 0)
	if !s.WALMissing() {
		t.Fatal("a missing WAL was not reported")
	}
}
