package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/kmsd-project/kmsd/api/client"
)

// TestKEKRotation is README's "Rotating the KEK": with keys of every kind
// made and used, kmsctl kek rotate --wait makes a new KEK and seals every
// secret again under it while signatures go on without an error; every
// key works as before (old signatures, KEM and HE ciphertexts), also
// after a restart; the primary cannot be retired, the old KEK can, once
// nothing is under it, and is then gone from the token, so a backup
// sealed under it no longer restores.
func TestKEKRotation(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	work, files := t.TempDir(), t.TempDir()
	p := start(t, dir, "--audit-checkpoint-interval", "100ms")
	p.waitReady(t)
	runScript(t, p, work, endToEnd)
	b0 := filepath.Join(files, "b0.kmsbak")
	if out, code := kmsctlOn(t, p, dir, "backup", "--out", b0); code != 0 {
		t.Fatalf("backup: %d %s", code, out)
	}
	c := adminClient(t, p, dir)
	before, err := c.KEKStatus(ctx, true)
	if err != nil {
		t.Fatal(err)
	}
	old := before.Primary
	if before.SealedUnder[old] != 6 || len(before.SealedUnder) != 1 || before.RecordKeyKEK != old {
		t.Fatalf("before the rotation: %+v", before)
	}
	// Signatures all through the rotation.
	var stop atomic.Bool
	var signed, failed atomic.Int64
	var wg sync.WaitGroup
	wg.Go(func() {
		for !stop.Load() {
			if _, err := c.Sign(ctx, "e2e-sig", []byte("during"), nil); err != nil {
				failed.Add(1)
				t.Errorf("a signature during the rotation: %v", err)
				return
			}
			signed.Add(1)
		}
	})
	out, code := kmsctlOn(t, p, dir, "kek", "rotate", "--wait")
	stop.Store(true)
	wg.Wait()
	if code != 0 {
		t.Fatalf("kek rotate: %d %s\n%s", code, out, p.stderr.String())
	}
	var st client.KEKStatus
	if err := json.Unmarshal([]byte(out[strings.Index(out, "{"):]), &st); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	next := st.Primary
	if next == old || st.Rotation == nil || st.Rotation.State != "done" || st.Rotation.Rewrapped != 6 || len(st.Others) != 1 || st.Others[0] != old {
		t.Fatalf("after the rotation: %s", out)
	}
	after, err := c.KEKStatus(ctx, true)
	if err != nil {
		t.Fatal(err)
	}
	if after.SealedUnder[next] != 6 || len(after.SealedUnder) != 1 || after.RecordKeyKEK != next {
		t.Fatalf("counts after the rotation: %+v", after)
	}
	t.Logf("%d signatures during the rotation", signed.Load())
	runScript(t, p, work, afterRestart)
	if _, code := kmsctlOn(t, p, dir, "kek", "rotate"); code != 0 {
		t.Log("a second rotation right after is allowed once the first is done")
	}
	// Wait for the second to finish, then retire the first two.
	if out, code := kmsctlOn(t, p, dir, "kek", "rotate", "--wait"); code != 3 && code != 0 {
		t.Fatalf("kek rotate while one runs or after: %d %s", code, out)
	}
	st2, err := c.KEKStatus(ctx, false)
	if err != nil {
		t.Fatal(err)
	}
	for st2.Rotation.State != "done" {
		if st2, err = c.KEKStatus(ctx, false); err != nil {
			t.Fatal(err)
		}
	}
	stopProc(t, p)
	p = start(t, dir, "--audit-checkpoint-interval", "100ms")
	p.waitReady(t)
	runScript(t, p, work, afterRestart)
	c = adminClient(t, p, dir)
	cur, err := c.KEKStatus(ctx, true)
	if err != nil {
		t.Fatal(err)
	}
	if out, code := kmsctlOn(t, p, dir, "kek", "retire", cur.Primary); code != 3 || !strings.Contains(out, "is the primary") {
		t.Fatalf("retire the primary: %d %s", code, out)
	}
	for _, id := range cur.Others {
		if out, code := kmsctlOn(t, p, dir, "kek", "retire", id); code != 0 {
			t.Fatalf("retire %s: %d %s", id, code, out)
		}
	}
	if out, code := kmsctlOn(t, p, dir, "kek", "retire", old); code == 0 {
		t.Fatalf("a KEK retired twice: %s", out)
	}
	runScript(t, p, work, afterRestart)
	stopProc(t, p)
	p = start(t, dir, "--audit-checkpoint-interval", "100ms")
	p.waitReady(t)
	runScript(t, p, work, afterRestart)
	if out, code := kmsctlOn(t, p, dir, "audit", "verify", "--identity-key-file", filepath.Join(work, "id.pub")); code != 0 {
		t.Fatalf("audit verify: %d %s", code, out)
	}
	// The backup sealed under the retired KEK does not restore.
	target := filepath.Join(t.TempDir(), "target")
	hsmArgs, hsmEnv := hsmOf(t, dir)
	out, errs, code := restoreCmd(t, hsmEnv, append([]string{"--data-dir", target, "--from", b0}, hsmArgs...)...)
	if code == 0 || !strings.Contains(errs, "no longer restores") || !strings.Contains(errs, old) {
		t.Fatalf("restore of a backup under a retired KEK: %d\n%s\n%s", code, out, errs)
	}
	if _, err := os.Stat(filepath.Join(target, "kms.db")); err == nil {
		t.Fatal("a refused restore made a kms.db")
	}
}
