package main

import (
	"encoding/json"
	"fmt"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/internal/testetcd"
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
	// A second rotation once the first is done: two old KEKs to retire.
	if out, code := kmsctlOn(t, p, dir, "kek", "rotate", "--wait"); code != 0 || !strings.Contains(out, `"state": "done"`) {
		t.Fatalf("a second rotation: %d %s", code, out)
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
	if len(cur.Others) != 2 || !slices.Contains(cur.Others, old) || len(cur.SealedUnder) != 1 || cur.SealedUnder[cur.Primary] != 6 {
		t.Fatalf("after two rotations and a restart: %+v", cur)
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

// TestKEKRewrapSurvivesKill9: kmsd killed with SIGKILL at random points
// of KEK rotations (60 rounds, as the crash tests): each time the
// restarted kmsd finishes the rotation, every secret ends under the new
// KEK (and the store's record key), every key still signs, nothing is
// lost, the old KEK is retired, and the audit log verifies at the end.
func TestKEKRewrapSurvivesKill9(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	p := start(t, dir)
	p.waitReady(t)
	c := adminClient(t, p, dir)
	const keys = 150
	for i := range keys {
		if _, err := c.CreateKey(ctx, client.CreateKeyRequest{Name: fmt.Sprintf("k%03d", i), Kind: "ml-dsa-44"}); err != nil {
			t.Fatal(err)
		}
	}
	signAll := func(round int, every int) {
		for i := 0; i < keys; i += every {
			if _, err := c.Sign(ctx, fmt.Sprintf("k%03d", i), []byte("m"), nil); err != nil {
				t.Fatalf("round %d: key k%03d does not sign: %v", round, i, err)
			}
		}
	}
	// done waits for the rotation to end and checks where everything is
	// sealed, then retires the old KEKs.
	done := func(round int) {
		deadline := time.Now().Add(60 * time.Second)
		for {
			st, err := c.KEKStatus(ctx, false)
			if err != nil {
				t.Fatalf("round %d: %v", round, err)
			}
			if st.Rotation == nil || st.Rotation.State == "done" {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("round %d: the rotation did not end: %+v\n%s", round, st.Rotation, p.stderr.String())
			}
			time.Sleep(20 * time.Millisecond)
		}
		st, err := c.KEKStatus(ctx, true)
		if err != nil {
			t.Fatal(err)
		}
		if len(st.SealedUnder) != 1 || st.SealedUnder[st.Primary] != keys+1 || st.RecordKeyKEK != st.Primary {
			t.Fatalf("round %d: after the rotation: %+v", round, st)
		}
		for _, id := range st.Others {
			if _, err := c.RetireKEK(ctx, id); err != nil {
				t.Fatalf("round %d: retire %s: %v", round, id, err)
			}
		}
	}
	t0 := time.Now()
	if _, err := c.RotateKEK(ctx); err != nil {
		t.Fatal(err)
	}
	done(0)
	took := time.Since(t0)
	rng := mrand.New(mrand.NewPCG(uint64(time.Now().UnixNano()), 1))
	killedDuring := 0
	for round := 1; round <= 60; round++ {
		if _, err := c.RotateKEK(ctx); err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		time.Sleep(time.Duration(rng.Int64N(int64(took))))
		if st, err := c.KEKStatus(ctx, false); err == nil && st.Rotation != nil && st.Rotation.State != "done" {
			killedDuring++
		}
		p.cmd.Process.Kill()
		p.wait(t, 10*time.Second)
		p = start(t, dir)
		p.waitReady(t)
		c = adminClient(t, p, dir)
		done(round)
		every := 15
		if round%10 == 0 {
			every = 1
		}
		signAll(round, every)
	}
	t.Logf("a rotation of %d keys takes %v; %d of 60 kills landed while it ran", keys+1, took.Round(time.Millisecond), killedDuring)
	if killedDuring < 10 {
		t.Fatalf("only %d of 60 kills landed during a rotation", killedDuring)
	}
	time.Sleep(time.Second)
	if res, _ := verifyLog(t, c); res.Size == 0 {
		t.Fatal("empty log")
	}
}

// TestKEKRotationOnReplicas: two replicas on etcd sharing the token. A
// rotation started on one is rewrapped once (one audit record per key),
// while both sign without an error; the other seals under the new KEK as
// soon as it follows the ring, so nothing is left under the old one,
// which is then retired while both go on.
func TestKEKRotationOnReplicas(t *testing.T) {
	cl := testetcd.Start(t, 1)
	dirs := []string{t.TempDir(), t.TempDir()}
	a := startReplica(t, cl, nil, dirs[0], "")
	a.waitReady(t)
	b := startReplica(t, cl, nil, dirs[1], dirs[0])
	b.waitReady(t)
	ca, cb := adminClient(t, a, dirs[0]), adminClient(t, b, dirs[0])
	const keys = 60
	for i := range keys {
		if _, err := ca.CreateKey(ctx, client.CreateKeyRequest{Name: fmt.Sprintf("r%02d", i), Kind: "ml-dsa-44"}); err != nil {
			t.Fatal(err)
		}
	}
	var stop atomic.Bool
	var wg sync.WaitGroup
	for _, c := range []*client.Client{ca, cb} {
		wg.Go(func() {
			for i := 0; !stop.Load(); i++ {
				if _, err := c.Sign(ctx, fmt.Sprintf("r%02d", i%keys), []byte("m"), nil); err != nil {
					t.Errorf("a signature during the rotation: %v", err)
					return
				}
			}
		})
	}
	if _, err := cb.RotateKEK(ctx); err != nil {
		t.Fatal(err)
	}
	// A key made on the other replica during the rotation.
	if _, err := ca.CreateKey(ctx, client.CreateKeyRequest{Name: "during", Kind: "ml-kem-768"}); err != nil {
		t.Fatal(err)
	}
	var st *client.KEKStatus
	deadline := time.Now().Add(60 * time.Second)
	for {
		var err error
		if st, err = ca.KEKStatus(ctx, true); err != nil {
			t.Fatal(err)
		}
		if st.Rotation != nil && st.Rotation.State == "done" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the rotation did not end: %+v\n%s\n%s", st.Rotation, a.stderr.String(), b.stderr.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	stop.Store(true)
	wg.Wait()
	if len(st.SealedUnder) != 1 || st.SealedUnder[st.Primary] != keys+2 || st.RecordKeyKEK != st.Primary {
		t.Fatalf("after the rotation: %+v", st)
	}
	time.Sleep(1500 * time.Millisecond) // both follow the ring
	if _, err := cb.CreateKey(ctx, client.CreateKeyRequest{Name: "after", Kind: "ml-dsa-44"}); err != nil {
		t.Fatal(err)
	}
	for _, id := range st.Others {
		if _, err := ca.RetireKEK(ctx, id); err != nil {
			t.Fatalf("retire %s: %v", id, err)
		}
	}
	for _, c := range []*client.Client{ca, cb} {
		for _, k := range []string{"r00", "r59", "after"} {
			if _, err := c.Sign(ctx, k, []byte("m"), nil); err != nil {
				t.Fatalf("sign with %s after the old KEK was retired: %v", k, err)
			}
		}
	}
	time.Sleep(500 * time.Millisecond)
	_, recs := verifyLog(t, ca)
	rewraps := map[string]int{}
	for _, r := range recs {
		if r.Operation == "kek rewrap" {
			rewraps[r.Key]++
		}
	}
	for i := range keys {
		if n := rewraps[fmt.Sprintf("r%02d", i)]; n != 1 {
			t.Fatalf("key r%02d was rewrapped %d times, want once: %v", i, n, rewraps)
		}
	}
}
