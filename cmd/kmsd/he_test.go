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
	// Wait until generation has finished at least one blob of the new
	// keyset (a file named by its digest, not a temporary one), then kill.
	kept := map[string]bool{}
	for _, e := range before {
		kept[e.Name()] = true
	}
	orphans := func() (done, temp []string) {
		ents, _ := os.ReadDir(blobsDir)
		for _, e := range ents {
			switch {
			case strings.HasPrefix(e.Name(), ".tmp-"):
				temp = append(temp, e.Name())
			case !kept[e.Name()]:
				done = append(done, e.Name())
			}
		}
		return done, temp
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		if done, _ := orphans(); len(done) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("generation finished no blob in 60 s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	p.cmd.Process.Signal(syscall.SIGKILL)
	p.wait(t, 10*time.Second)
	if err := <-done; err == errAcked {
		t.Fatal("the key was created before the kill; the test needs a slower keyset")
	}
	left, _ := orphans()
	if len(left) == 0 {
		t.Fatal("no finished blob of the interrupted keyset on disk after the kill")
	}
	q := start(t, dir)
	q.waitReady(t)
	c = adminClient(t, q, dir)
	if _, err := c.GetKey(ctx, "interrupted"); !client.IsProblem(err, "not-found") {
		t.Fatalf("the interrupted key exists: %v", err)
	}
	// After the restart exactly the kept key's blobs remain: every blob the
	// interrupted generation finished, and every temporary file, is gone.
	if done, temp := orphans(); len(done) != 0 || len(temp) != 0 {
		t.Fatalf("after restart: orphan blobs %v, temporary files %v", done, temp)
	}
	for name := range kept {
		if _, err := os.Stat(filepath.Join(blobsDir, name)); err != nil {
			t.Fatalf("a blob of the kept key is gone: %v", err)
		}
	}
	// The removal of finished orphans is logged with their count.
	var logged struct {
		Msg   string `json:"msg"`
		Count int    `json:"count"`
	}
	for _, line := range strings.Split(q.stderr.String(), "\n") {
		if strings.Contains(line, "removed blobs no committed version lists") {
			json.Unmarshal([]byte(line), &logged)
		}
	}
	if logged.Count != len(left) {
		t.Fatalf("the restart logged removing %d orphan blobs, %d were on disk", logged.Count, len(left))
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
