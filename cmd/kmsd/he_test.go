package main

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/api/client"
)

var errAcked = errors.New("created")

// TestKill9DuringHEGeneration: kmsd killed while generating a keyset (a new
// key, then a rotation) leaves no half version, and the blobs it had
// written are removed at the next start.
func TestKill9DuringHEGeneration(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	p := start(t, dir)
	p.waitReady(t)
	c := adminClient(t, p, dir)
	small := client.Policy{Params: json.RawMessage(`"ckks-logn13"`), Rotations: []int{1}, Relinearization: true}
	if _, err := c.CreateKey(ctx, client.CreateKeyRequest{Name: "kept", Kind: "ckks", Policy: &small}); err != nil {
		t.Fatal(err)
	}
	blobsDir := filepath.Join(dir, "blobs")
	before, _ := os.ReadDir(blobsDir)
	// A large keyset: logN 14 with 12 rotations takes seconds here.
	big := client.Policy{Params: json.RawMessage(`"ckks-logn14"`), Rotations: []int{1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048}, Relinearization: true}
	done := make(chan error, 2)
	go func() {
		// A keyset this size answers 202 (an operation), so only the
		// operation is acknowledged; or the kill cuts the request.
		k, _, err := c.CreateKeyOrOperation(ctx, client.CreateKeyRequest{Name: "interrupted", Kind: "ckks", Policy: &big})
		if err == nil && k != nil {

			done <- errAcked
			return
		}
		done <- err
	}()
	// Wait until generation has written some blobs, then kill.
	deadline := time.Now().Add(30 * time.Second)
	for {
		ents, _ := os.ReadDir(blobsDir)
		if len(ents) > len(before)+1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("generation wrote no blobs")
		}
		time.Sleep(20 * time.Millisecond)
	}
	p.cmd.Process.Signal(syscall.SIGKILL)
	p.wait(t, 10*time.Second)
	if err := <-done; err == errAcked {
		t.Fatal("the key was created before the kill; the test needs a slower keyset")
	}
	q := start(t, dir)
	q.waitReady(t)
	c = adminClient(t, q, dir)
	if _, err := c.GetKey(ctx, "interrupted"); !client.IsProblem(err, "not-found") {
		t.Fatalf("the interrupted key exists: %v", err)
	}
	after, _ := os.ReadDir(blobsDir)
	if len(after) != len(before) {
		t.Fatalf("%d blob files after restart, want the %d of the kept key", len(after), len(before))
	}
	if !strings.Contains(q.stderr.String(), "removed blobs no committed version lists") {
		t.Fatal("the restart did not report removing orphans")
	}
	// The kept key still serves its manifest and blobs.
	k, err := c.GetKey(ctx, "kept")
	if err != nil || k.LatestVersion != 1 {
		t.Fatalf("kept key: %+v %v", k, err)
	}
	if _, err := c.PublicKey(ctx, "kept", 1); err != nil {
		t.Fatal(err)
	}
}
