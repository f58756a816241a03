package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/audit"
	"github.com/kmsd-project/kmsd/internal/testetcd"
	"github.com/kmsd-project/kmsd/kms"
)

// verifyLog fetches the latest checkpoint and the records it covers from a
// running kmsd and verifies them with the identity key.
func verifyLog(t *testing.T, c *client.Client) (*audit.Result, []*kms.AuditRecord) {
	t.Helper()
	id, err := c.Identity(ctx)
	if err != nil {
		t.Fatal(err)
	}
	cp, err := c.AuditCheckpoint(ctx)
	if err != nil {
		t.Fatal(err)
	}
	chk, err := audit.OpenCheckpoint(cp, id.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := c.AuditRecords(ctx, 0, chk.Size)
	if err != nil {
		t.Fatal(err)
	}
	res, _, err := audit.Verify(id.PublicKey, raw, [][]byte{cp}, nil)
	if err != nil {
		t.Fatalf("the audit log does not verify: %v", err)
	}
	recs := make([]*kms.AuditRecord, len(raw))
	for i, b := range raw {
		recs[i], _ = kms.DecodeAuditRecord(b)
	}
	return res, recs
}

type op struct {
	operation, key string
	version        uint64
	status         int
}

func hasRecord(recs []*kms.AuditRecord, o op) bool {
	for _, r := range recs {
		if r.Operation == o.operation && r.Key == o.key && r.Version == o.version && r.Status == o.status {
			return true
		}
	}
	return false
}

// TestAuditSurvivesKill9: SIGKILL under a load of creates, rotations and
// reads, several times; after each restart the audit log verifies against
// the checkpoint kmsd signs at start, and every acknowledged request has its
// record: on the embedded bbolt store and on etcd.
func TestAuditSurvivesKill9(t *testing.T) {
	t.Run("bolt", func(t *testing.T) { auditSurvivesKill9(t, nil) })
	t.Run("etcd", func(t *testing.T) {
		c := testetcd.Start(t, 1)
		auditSurvivesKill9(t, []string{"--store", "etcd", "--etcd-endpoints", strings.Join(c.Endpoints(), ",")})
	})
}

// auditSurvivesKill9 runs the test on the store the args choose (nil: the
// embedded bbolt store, whose audit WAL the crashes must exercise).
func auditSurvivesKill9(t *testing.T, storeArgs []string) {
	dir := filepath.Join(t.TempDir(), "data")
	var acked []op
	walRecoveries := 0
	for round := 0; round < 4; round++ {
		p := start(t, dir, append(slices.Clone(storeArgs), "--audit-checkpoint-interval", "200ms")...)
		p.waitReady(t)
		c := adminClient(t, p, dir)
		if round > 0 {
			// The start-up checkpoint covers everything before the kill.
			deadline := time.Now().Add(10 * time.Second)
			for {
				res, recs := verifyLog(t, c)
				missing := 0
				for _, o := range acked {
					if !hasRecord(recs, o) {
						missing++
					}
				}
				if missing == 0 {
					t.Logf("round %d: %d records verified, all %d acknowledged requests recorded", round, res.Size, len(acked))
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("round %d: %d acknowledged requests have no record", round, missing)
				}
				time.Sleep(100 * time.Millisecond)
			}
		}
		done := make(chan struct{})
		results := make(chan op, 100000)
		if round == 0 {
			if _, err := c.CreateKey(ctx, client.CreateKeyRequest{Name: "hot", Kind: "ml-dsa-44"}); err != nil {
				t.Fatal(err)
			}
		}
		go func() { // reads only: their records wait in the WAL between flushes
			defer func() { done <- struct{}{} }()
			for {
				if _, err := c.PublicKey(ctx, "hot", 1); err != nil {
					return
				}
			}
		}()
		// On odd rounds the writers stop before the kill, so it lands
		// while only reads run: their acknowledged records are then in the
		// WAL alone (every state change moves the WAL into bbolt), and the
		// restart must recover them. Even rounds kill amid state changes.
		var stopWriters atomic.Bool
		writersDone := make(chan struct{}, 3)
		for w := 0; w < 3; w++ {
			go func(w int) {
				defer func() { writersDone <- struct{}{} }()
				for i := 0; !stopWriters.Load(); i++ {
					name := fmt.Sprintf("r%d-w%d-%d", round, w, i)
					if _, err := c.CreateKey(ctx, client.CreateKeyRequest{Name: name, Kind: "ml-dsa-44"}); err != nil {
						return
					}
					results <- op{"POST /v1/keys", name, 1, 201}
					if _, err := c.PublicKey(ctx, name, 1); err != nil {
						return
					}
					results <- op{"GET /v1/keys/{name}/versions/{version}/public-key", name, 1, 200}
					v, err := c.Rotate(ctx, name)
					if err != nil {
						return
					}
					results <- op{"POST /v1/keys/{name}/rotate", name, v.Version, 201}
				}
			}(w)
		}
		time.Sleep(time.Duration(200+100*round) * time.Millisecond)
		if round%2 == 1 {
			stopWriters.Store(true)
			for w := 0; w < 3; w++ {
				<-writersDone
			}
			time.Sleep(50 * time.Millisecond) // reads only, within one flush interval
		}
		p.cmd.Process.Signal(syscall.SIGKILL)
		p.wait(t, 10*time.Second)
		<-done
		if round%2 == 0 {
			for w := 0; w < 3; w++ {
				<-writersDone
			}
		}
		if round > 0 && strings.Contains(p.stderr.String(), "audit WAL: copied records") {
			walRecoveries++
		}
		close(results)
		for o := range results {
			acked = append(acked, o)
		}
	}
	if len(acked) < 30 {
		t.Fatalf("only %d requests acknowledged", len(acked))
	}
	p := start(t, dir, storeArgs...)
	p.waitReady(t)
	if strings.Contains(p.stderr.String(), "audit WAL: copied records") {
		walRecoveries++
	}
	if storeArgs == nil {
		if walRecoveries == 0 {
			t.Fatal("no restart found records in the audit WAL: the crash path of the WAL was not exercised")
		}
		t.Logf("%d of 4 restarts copied records from the audit WAL", walRecoveries)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, recs := verifyLog(t, adminClient(t, p, dir))
		n := 0
		for _, o := range acked {
			if hasRecord(recs, o) {
				n++
			}
		}
		if n == len(acked) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d acknowledged requests have no record", len(acked)-n, len(acked))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestFullDiskFailsClosed puts the data dir on a small tmpfs, fills it, and
// checks that state changes then fail with 503 and change nothing; that
// reads go on while their records fit in the preallocated audit WAL and
// fail with 503 once it is full; that every acknowledged request is intact
// and recorded; and that kmsd recovers once space is freed. Needs root
// (mount), as CI has.
func TestFullDiskFailsClosed(t *testing.T) {
	mnt := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount a tmpfs for the full-disk test (needs root): %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", mnt).Run() })
	dir := filepath.Join(mnt, "data")
	p := start(t, dir, "--audit-wal-mib", "1")
	p.waitReady(t)
	c := adminClient(t, p, dir)
	if _, err := c.CreateKey(ctx, client.CreateKeyRequest{Name: "before", Kind: "ml-dsa-65"}); err != nil {
		t.Fatal(err)
	}
	// Fill the disk.
	filler := filepath.Join(mnt, "filler")
	f, err := os.Create(filler)
	if err != nil {
		t.Fatal(err)
	}
	chunk := make([]byte, 1<<20)
	for {
		if _, err := f.Write(chunk); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatal(err)
			}
			break
		}
	}
	small := make([]byte, 4096)
	for {
		if _, err := f.Write(small); err != nil {
			break
		}
	}
	f.Close()

	var created, refused []string
	for i := 0; i < 2000 && len(refused) < 20; i++ {
		name := fmt.Sprintf("full-%d", i)
		_, err := c.CreateKey(ctx, client.CreateKeyRequest{Name: name, Kind: "ml-dsa-65"})
		switch {
		case err == nil:
			created = append(created, name)
		case client.StatusOf(err) == 503:
			refused = append(refused, name)
		default:
			t.Fatalf("create on a full disk: %v", err)
		}
	}
	if len(refused) == 0 {
		t.Fatalf("no request was refused on a full disk (%d succeeded)", len(created))
	}
	// Reads need their record too: the preallocated WAL (1 MiB here, 4 KiB
	// per group) takes them until it is full and cannot be flushed into
	// kms.db; then they fail closed.
	reads := 0
	for ; reads < 1000; reads++ {
		_, err := c.PublicKey(ctx, "before", 1)
		if client.StatusOf(err) == 503 {
			break
		}
		if err != nil {
			t.Fatalf("read %d on a full disk: %v", reads, err)
		}
	}
	if reads == 0 || reads == 1000 {
		t.Fatalf("%d reads succeeded on a full disk: want some (WAL room), then 503 (WAL full)", reads)
	}
	os.Remove(filler)
	// Recovery: the next requests succeed.
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err := c.CreateKey(ctx, client.CreateKeyRequest{Name: "after", Kind: "ml-dsa-65"}); err == nil {
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("no recovery after freeing space: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	for _, n := range refused {
		if _, err := c.GetKey(ctx, n); !client.IsProblem(err, "not-found") {
			t.Fatalf("refused create of %s left a key: %v", n, err)
		}
	}
	for _, n := range append(created, "before", "after") {
		if _, err := c.Sign(ctx, n, []byte("m"), nil); err != nil {
			t.Fatalf("acknowledged key %s: %v", n, err)
		}
	}
	// Restart: a checkpoint at start covers everything; all acknowledged
	// creates are recorded, and none of the refused ones.
	p.cmd.Process.Signal(syscall.SIGTERM)
	p.wait(t, 15*time.Second)
	q := start(t, dir)
	q.waitReady(t)
	_, recs := verifyLog(t, adminClient(t, q, dir))
	for _, n := range append(created, "before", "after") {
		if !hasRecord(recs, op{"POST /v1/keys", n, 1, 201}) {
			t.Fatalf("acknowledged create of %s has no record", n)
		}
	}
	for _, n := range refused {
		if hasRecord(recs, op{"POST /v1/keys", n, 1, 201}) {
			t.Fatalf("refused create of %s is recorded as a success", n)
		}
	}
	okReads := 0
	for _, r := range recs {
		if r.Operation == "GET /v1/keys/{name}/versions/{version}/public-key" && r.Key == "before" && r.Status == 200 {
			okReads++
		}
	}
	if okReads != reads {
		t.Fatalf("%d reads were answered on the full disk, %d are recorded", reads, okReads)
	}
	if !strings.Contains(p.stderr.String(), "no space left on device") {
		t.Fatalf("the operational log does not name the cause")
	}
	t.Logf("%d creates succeeded and %d were refused on the full disk; %d reads answered before the WAL filled", len(created), len(refused), reads)
	_ = context.Background
}
