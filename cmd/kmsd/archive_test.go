package main

import (
	"errors"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/api/layout"
	"github.com/kmsd-project/kmsd/audit"
	"github.com/kmsd-project/kmsd/internal/testutil"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/store/archive"
	"github.com/kmsd-project/kmsd/store/bolt"
)

// archivedSize is the size the archive's checkpoint covers (0: none yet).
func archivedSize(dir string) uint64 {
	b, err := os.ReadFile(filepath.Join(dir, layout.CheckpointPath))
	if err != nil {
		return 0
	}
	n, _ := archive.CheckpointSize(b)
	return n
}

// waitArchived waits until the archive covers at least n records.
func waitArchived(t *testing.T, p *proc, dir string, n uint64) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for archivedSize(dir) < n {
		if time.Now().After(deadline) {
			t.Fatalf("the archive covers %d records after 30 s, want %d\n%s", archivedSize(dir), n, p.stderr.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestAuditArchive runs kmsd with --audit-archive on a small tmpfs: the
// log is archived as a tlog-tiles log that kmsctl verifies from the
// directory and through kmsd's /v1/audit/tiles/; tiles are served with
// the spec's caching and only at the spec's paths; with the archive's
// disk full kmsd goes on serving and auditing, says so, and archives
// the rest once there is room; an edited tile is found and named. Needs
// root (mount), as CI has.
func TestAuditArchive(t *testing.T) {
	mnt := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount a tmpfs for the archive (needs root): %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", mnt).Run() })
	arch := filepath.Join(mnt, "archive")
	dir := filepath.Join(t.TempDir(), "data")
	p := start(t, dir, "--audit-archive", arch, "--audit-checkpoint-interval", "100ms", "--audit-checkpoint-every", "64")
	p.waitReady(t)
	c := adminClient(t, p, dir)
	if _, err := c.CreateKey(ctx, client.CreateKeyRequest{Name: "archived", Kind: "ml-dsa-65"}); err != nil {
		t.Fatal(err)
	}
	for range 300 {
		if _, err := c.GetKey(ctx, "archived"); err != nil {
			t.Fatal(err)
		}
	}
	waitArchived(t, p, arch, 300)
	kmsctl := func(args ...string) (string, int) {
		cmd := exec.Command(kmsctlBin, args...)
		cmd.Env = append(os.Environ(), "KMS_URL="+p.url(), "KMS_TOKEN_FILE="+filepath.Join(dir, "admin.token"), "KMS_CA_CERT="+filepath.Join(dir, "tls", "ca.pem"))
		out, err := cmd.CombinedOutput()
		code := 0
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			code = ee.ExitCode()
		}
		return string(out), code
	}
	idFile := filepath.Join(t.TempDir(), "id.pub")
	saved := filepath.Join(t.TempDir(), "saved.checkpoint")
	for _, where := range []string{arch, "kmsd"} {
		out, code := kmsctl("audit", "verify", "--identity-key-file", idFile, "--fetch-identity", "--archive", where, "--save-checkpoint", saved)
		if code != 0 || !strings.Contains(out, "audit archive intact") {
			t.Fatalf("verify --archive %s: exit %d\n%s", where, code, out)
		}
		// The checkpoint saved is one the archive held, signed by kmsd
		// (the archive may have moved on since: the verifications are
		// audited too).
		got, _ := os.ReadFile(saved)
		cp, err := audit.OpenCheckpoint(got, mustIdentity(t, c))
		if err != nil || cp.Size < 300 || cp.Size > archivedSize(arch) {
			t.Fatalf("verify --archive %s saved %q: %v", where, got, err)
		}
	}

	// The tiles as a tlog-tiles client fetches them.
	tok, _ := os.ReadFile(filepath.Join(dir, "admin.token"))
	tcfg, err := client.TLSConfig(filepath.Join(dir, "tls", "ca.pem"), "", "")
	if err != nil {
		t.Fatal(err)
	}
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: tcfg}, Timeout: 10 * time.Second}
	get := func(path string) (*http.Response, []byte) {
		req, _ := http.NewRequest("GET", p.url()+"/v1/audit/tiles/"+path, nil)
		req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(tok)))
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp, b
	}
	if resp, b := get(layout.TilePath(0, 0, 0)); resp.StatusCode != 200 || len(b) != 8192 || !strings.Contains(resp.Header.Get("Cache-Control"), "immutable") {
		t.Fatalf("full tile: %d, %d bytes, %q", resp.StatusCode, len(b), resp.Header.Get("Cache-Control"))
	}
	if resp, b := get(layout.CheckpointPath); resp.StatusCode != 200 || !strings.HasPrefix(string(b), "github.com/kmsd-project/kmsd/audit/") || resp.Header.Get("Cache-Control") != "no-cache" {
		t.Fatalf("checkpoint: %d %q %q", resp.StatusCode, b, resp.Header.Get("Cache-Control"))
	}
	for _, c := range []struct {
		path string
		want int
	}{{"tile/00/000", 400}, {"tile/0/000.p/256", 400}, {"tile/0/%2e%2e/%2e%2e/kms.db", 400}, {"kms.db", 400}, {"tile/entries/999", 404}} {
		if resp, b := get(c.path); resp.StatusCode != c.want || !strings.Contains(resp.Header.Get("Content-Type"), "problem+json") {
			t.Errorf("%s: %d %s", c.path, resp.StatusCode, b)
		}
	}

	// The archive's disk full: kmsd serves and audits on, and says the
	// archive cannot be written.
	filler, err := os.Create(filepath.Join(mnt, "filler"))
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := filler.Write(make([]byte, 64<<10)); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatal(err)
			}
			break
		}
	}
	filler.Close()
	before := archivedSize(arch)
	for range 600 {
		if _, err := c.GetKey(ctx, "archived"); err != nil {
			t.Fatalf("a read with the archive's disk full: %v", err)
		}
	}
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(p.stderr.String(), "audit archive: cannot write") {
		if time.Now().After(deadline) {
			t.Fatalf("kmsd did not say the archive cannot be written:\n%s", p.stderr.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if got := archivedSize(arch); got > before+512 {
		t.Fatalf("the archive grew from %d to %d on a full disk", before, got)
	}
	h, err := c.Readiness(ctx)
	if err != nil {
		t.Fatalf("readyz with the archive's disk full: %v", err)
	}
	if a := h.AuditArchive; a == nil || a.FailingSince == "" || a.Lag == 0 || a.Archived != archivedSize(arch) {
		t.Fatalf("readyz with the archive's disk full: %+v (archive at %d)", a, archivedSize(arch))
	}
	os.Remove(filepath.Join(mnt, "filler"))
	waitArchived(t, p, arch, before+600)
	// The checkpoint the test saw is written before the log line.
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(p.stderr.String(), "audit archive: writing again"); {
		if time.Now().After(deadline) {
			t.Fatalf("kmsd did not say the archive recovered:\n%s", p.stderr.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if h, err := c.Readiness(ctx); err != nil || h.AuditArchive == nil || h.AuditArchive.FailingSince != "" {
		t.Errorf("readyz after the archive recovered: %+v %v", h, err)
	}
	if out, code := kmsctl("audit", "verify", "--identity-key-file", idFile, "--archive", arch); code != 0 {
		t.Fatalf("verify after the disk was full: exit %d\n%s", code, out)
	}

	// The archive exported straight from its directory verifies as an
	// export.
	exp := filepath.Join(t.TempDir(), "export")
	if out, code := kmsctl("audit", "export", "--out", exp, "--archive", arch); code != 0 || !strings.Contains(out, "exported") {
		t.Fatalf("export --archive: exit %d\n%s", code, out)
	}
	if out, code := kmsctl("audit", "verify", "--identity-key-file", idFile, "--export", exp); code != 0 || !strings.Contains(out, "audit log intact") {
		t.Fatalf("verify of the archive's export: exit %d\n%s", code, out)
	}
	// A range of it: the records [256, 300) exactly as the log holds them.
	part := filepath.Join(t.TempDir(), "part")
	if out, code := kmsctl("audit", "export", "--out", part, "--archive", arch, "--start", "256", "--end", "300"); code != 0 || !strings.Contains(out, "exported 44 records (from index 256)") {
		t.Fatalf("export of a range: exit %d\n%s", code, out)
	}
	whole, _ := os.ReadFile(filepath.Join(exp, "records.jsonl"))
	got, _ := os.ReadFile(filepath.Join(part, "records.jsonl"))
	if lines := strings.SplitAfter(string(whole), "\n"); strings.Join(lines[256:300], "") != string(got) {
		t.Fatal("the range export is not those records of the whole")
	}
	if out, code := kmsctl("audit", "export", "--out", part, "--archive", arch, "--start", "10", "--end", "99999999"); code != 2 || !strings.Contains(out, "the checkpoint covers") {
		t.Fatalf("export of a range past the log: exit %d\n%s", code, out)
	}

	// An edited tile is found and named.
	tp := filepath.Join(arch, layout.TilePath(0, 1, 0))
	b, err := os.ReadFile(tp)
	if err != nil {
		t.Fatal(err)
	}
	b[100] ^= 1
	os.WriteFile(tp, b, 0o644)
	out, code := kmsctl("audit", "verify", "--identity-key-file", idFile, "--archive", arch)
	if code != 1 || !strings.Contains(out, layout.TilePath(0, 1, 0)) {
		t.Fatalf("verify of an edited tile: exit %d\n%s", code, out)
	}
}

// TestAuditRetentionSurvivesKill9: kmsd with --audit-retain 1s under
// reads, killed with SIGKILL four times: the store's rows of archived
// records are pruned (readyz says below which), and after each restart
// the whole log, pruned records read back from the archive, verifies
// against kmsd's signed checkpoint, every acknowledged read has its
// record, and the archive verifies on its own.
func TestAuditRetentionSurvivesKill9(t *testing.T) {
	arch := filepath.Join(t.TempDir(), "archive")
	dir := filepath.Join(t.TempDir(), "data")
	args := []string{"--audit-archive", arch, "--audit-retain", "1s", "--audit-checkpoint-interval", "100ms", "--audit-checkpoint-every", "64"}
	p := start(t, dir, args...)
	p.waitReady(t)
	c := adminClient(t, p, dir)
	if _, err := c.CreateKey(ctx, client.CreateKeyRequest{Name: "retained", Kind: "ml-dsa-65"}); err != nil {
		t.Fatal(err)
	}
	acked := 0
	for round := range 4 {
		stop := time.Now().Add(time.Duration(700+round*200) * time.Millisecond)
		for time.Now().Before(stop) {
			if _, err := c.GetKey(ctx, "retained"); err != nil {
				t.Fatalf("round %d: %v", round, err)
			}
			acked++
		}
		p.cmd.Process.Kill()
		p.wait(t, 10*time.Second)
		p = start(t, dir, args...)
		p.waitReady(t)
		c = adminClient(t, p, dir)
		cur := p
		t.Cleanup(func() {
			if t.Failed() {
				time.Sleep(200 * time.Millisecond) // the failed request's log line
				t.Logf("kmsd:\n%s", cur.stderr.String())
			}
		})
		res, recs := verifyLog(t, c)
		n := 0
		for _, r := range recs {
			if r.Operation == "GET /v1/keys/{name}" && r.Key == "retained" && r.Status == 200 {
				n++
			}
		}
		if n < acked {
			t.Fatalf("round %d: %d acknowledged reads, %d records of them in a log of %d", round, acked, n, res.Size)
		}
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		h, err := c.Readiness(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if a := h.AuditArchive; a != nil && a.PrunedBelow > 0 && a.FailingSince == "" {
			if a.Archived < a.PrunedBelow {
				t.Fatalf("pruned below %d with only %d archived", a.PrunedBelow, a.Archived)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("nothing pruned after 20 s: %+v\n%s", h.AuditArchive, p.stderr.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	verifyLog(t, c)
	if _, err := archive.Verify(ctx, archive.Dir{Root: arch}, mustIdentity(t, c)); err != nil {
		t.Fatal(err)
	}
}

func mustIdentity(t *testing.T, c *client.Client) []byte {
	t.Helper()
	id, err := c.Identity(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return id.PublicKey
}

// TestStartSaysHowFastTheLogGrows: without --audit-retain, kmsd says at
// start how many records a day the store's log has been growing by.
func TestStartSaysHowFastTheLogGrows(t *testing.T) {
	// A token to seal the store's record key under: a data dir's.
	dir := filepath.Join(t.TempDir(), "data")
	p := start(t, dir)
	p.waitReady(t)
	p.cmd.Process.Signal(syscall.SIGTERM)
	p.wait(t, 15*time.Second)
	st, err := bolt.Open(filepath.Join(t.TempDir(), "kms.db"), bolt.Options{Sealer: dataSealer(t, dir)})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	// 48 records over the last two days: 24 a day.
	start := time.Now().Add(-48 * time.Hour).UTC()
	for i := range 48 {
		rec := &kms.AuditRecord{Time: start.Add(time.Duration(i) * time.Hour).Format(time.RFC3339Nano), Actor: "system", Operation: "GET /v1/keys", Status: 200}
		if err := st.Audit().AppendAudit(ctx, rec); err != nil {
			t.Fatal(err)
		}
	}
	var out testutil.Buffer
	logGrowth(ctx, st.Audit(), slog.New(slog.NewJSONHandler(&out, nil)))
	if !strings.Contains(out.String(), `"records_per_day":24`) || !strings.Contains(out.String(), "no --audit-retain") {
		t.Fatalf("start log: %s", out.String())
	}
}
