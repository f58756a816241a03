package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	clientv3 "go.etcd.io/etcd/client/v3"
	"io"
	mrand "math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/hsm/softhsm"
	"github.com/kmsd-project/kmsd/internal/testetcd"
	"github.com/kmsd-project/kmsd/internal/tests3"
	"github.com/kmsd-project/kmsd/store/archive"
	"github.com/kmsd-project/kmsd/store/backup"
)

// hsmOf is the flags and environment that open the embedded SoftHSM token
// of data dir dir from another data dir or another store: the HSM the
// backups of a drill are sealed under, kept apart from the store as an
// HSM is.
func hsmOf(t *testing.T, dir string) (args, env []string) {
	t.Helper()
	mod, err := softhsm.FindModule()
	if err != nil {
		t.Fatal(err)
	}
	h := filepath.Join(dir, "softhsm")
	return []string{"--pkcs11-module", mod, "--pkcs11-pin-file", filepath.Join(h, "pin")}, []string{"SOFTHSM2_CONF=" + filepath.Join(h, "softhsm2.conf")}
}

// softhsmCopy copies data dir dir's SoftHSM token directory and returns
// the SOFTHSM2_CONF setting that points at the copy.
func softhsmCopy(t *testing.T, dir string) string {
	t.Helper()
	to := filepath.Join(t.TempDir(), "softhsm")
	if err := os.CopyFS(to, os.DirFS(filepath.Join(dir, "softhsm"))); err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(to, "softhsm2.conf")
	b, err := os.ReadFile(conf)
	if err != nil {
		t.Fatal(err)
	}
	var lines []string
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "directories.tokendir") {
			l = "directories.tokendir = " + filepath.Join(to, "tokens")
		}
		lines = append(lines, l)
	}
	if err := os.WriteFile(conf, []byte(strings.Join(lines, "\n")), 0o600); err != nil {
		t.Fatal(err)
	}
	return "SOFTHSM2_CONF=" + conf
}

// restoreCmd runs kmsd restore and returns its stdout, stderr and exit
// code.
func restoreCmd(t *testing.T, env []string, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.Command(kmsdBin, append([]string{"restore"}, args...)...)
	cmd.Env = append(append(os.Environ(), "SOFTHSM2_CONF=/nonexistent"), env...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return out.String(), errb.String(), code
}

// kmsctlOn runs kmsctl against p with the admin token in tokenDir.
func kmsctlOn(t *testing.T, p *proc, tokenDir string, args ...string) (string, int) {
	t.Helper()
	cmd := exec.Command(kmsctlBin, args...)
	cmd.Env = append(os.Environ(), "KMS_URL="+p.url(), "KMS_TOKEN_FILE="+filepath.Join(tokenDir, "admin.token"), "KMS_CA_CERT="+filepath.Join(p.dataDir, "tls", "ca.pem"), "KMS_TIMEOUT=5m")
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return string(out), ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return string(out), 0
}

func fileSum(t *testing.T, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

func stopProc(t *testing.T, p *proc) {
	t.Helper()
	p.cmd.Process.Signal(syscall.SIGTERM)
	if code := p.wait(t, 30*time.Second); code != 0 {
		t.Fatalf("kmsd exit %d\n%s", code, p.stderr.String())
	}
}

// TestBackupRestoreDrill is the drill README's "Backup and restore"
// describes: keys of every kind are made and used, kmsctl backup takes a
// backup while kmsd serves, more changes follow, the store is lost, and
// kmsd restore brings back every version as it was at the backup (old
// signatures verify, old KEM ciphertexts decapsulate, HE ciphertexts
// made before decrypt, new signatures work); what came after is gone and
// kmsctl audit verify against a checkpoint saved after the backup says
// "rolled back by a restore" with the sizes. The backup moves the store
// onto etcd (HE blobs to S3) and back onto bbolt. A tampered and a
// truncated copy are refused, and so is a restore into a target that
// holds a store, which is left unchanged.
func TestBackupRestoreDrill(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	work, files := t.TempDir(), t.TempDir()
	p := start(t, dir, "--audit-checkpoint-interval", "100ms")
	p.waitReady(t)
	runScript(t, p, work, endToEnd)
	b1 := filepath.Join(files, "b1.kmsbak")
	out, code := kmsctlOn(t, p, dir, "backup", "--out", b1)
	if code != 0 {
		t.Fatalf("kmsctl backup: exit %d\n%s\n%s", code, out, p.stderr.String())
	}
	if _, err := os.Stat(b1 + ".partial"); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the .partial file is left beside a finished backup: %v", err)
	}
	var rep struct {
		ID      string         `json:"id"`
		Summary backup.Summary `json:"summary"`
	}
	if err := json.Unmarshal([]byte(out[strings.Index(out, "{"):]), &rep); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	// Three keys and the identity; two rotated; the admin token and the
	// encryptor's; one HE keyset's blobs.
	if s := rep.Summary; s.Keys != 4 || s.Versions != 6 || s.Tokens != 2 || s.Blobs == 0 || s.AuditSize == 0 || s.CheckpointSize == 0 {
		t.Fatalf("backup summary %+v", s)
	}
	if !strings.Contains(p.stderr.String(), `"msg":"backup taken"`) {
		t.Fatalf("kmsd did not log the backup:\n%s", p.stderr.String())
	}
	// The backup is audited, and the backup holds its own record.
	c := adminClient(t, p, dir)
	raw, err := c.AuditRecords(ctx, 0, rep.Summary.AuditSize)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(raw[len(raw)-1]), `"operation":"GET /v1/backup"`) {
		t.Fatalf("the backup's last record is not its own: %s", raw[len(raw)-1])
	}
	// Secrets stay sealed: the file holds no key's secret in the clear.
	if b, _ := os.ReadFile(b1); bytes.Contains(b, []byte(`"secret"`)) || bytes.Contains(b, []byte("BEGIN PRIVATE")) {
		t.Fatal("the backup holds something that looks like an unsealed secret")
	}

	// Changes after the backup, and a checkpoint saved after them.
	if _, err := c.CreateKey(ctx, client.CreateKeyRequest{Name: "after-backup", Kind: "ml-dsa-44"}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Rotate(ctx, "e2e-sig"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond) // a checkpoint covers them
	if out, code := kmsctlOn(t, p, dir, "audit", "verify", "--identity-key-file", filepath.Join(work, "id.pub"), "--save-checkpoint", filepath.Join(files, "later.cp")); code != 0 {
		t.Fatalf("audit verify: %d %s", code, out)
	}
	stopProc(t, p)

	// Tampered and truncated copies are refused, and change nothing.
	good, err := os.ReadFile(b1)
	if err != nil {
		t.Fatal(err)
	}
	bad := map[string][]byte{
		"tampered":  append(append(append([]byte(nil), good[:len(good)/2]...), good[len(good)/2]^1), good[len(good)/2+1:]...),
		"truncated": good[:len(good)-100],
		"cut":       good[:len(good)/3],
	}
	lost := filepath.Join(t.TempDir(), "lost")
	if err := os.Rename(filepath.Join(dir, "kms.db"), lost); err != nil {
		t.Fatal(err)
	}
	os.Remove(filepath.Join(dir, "kms.db-audit-wal"))
	os.RemoveAll(filepath.Join(dir, "blobs"))
	for name, b := range bad {
		f := filepath.Join(files, name+".kmsbak")
		if err := os.WriteFile(f, b, 0o600); err != nil {
			t.Fatal(err)
		}
		out, errs, code := restoreCmd(t, nil, "--data-dir", dir, "--from", f)
		if code == 0 || out != "" || !strings.Contains(errs, "nothing was changed") {
			t.Fatalf("%s backup: restore exit %d\n%s\n%s", name, code, out, errs)
		}
		if _, err := os.Stat(filepath.Join(dir, "kms.db")); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("%s backup: a kms.db appeared: %v", name, err)
		}
		if o, code := kmsctlOn(t, p, dir, "backup", "verify", f); code != 1 {
			t.Fatalf("%s backup: kmsctl backup verify exit %d: %s", name, code, o)
		}
	}

	// A pinned identity key that is not the service's refuses it.
	other := filepath.Join(files, "other.pub")
	os.WriteFile(other, []byte(base64.StdEncoding.EncodeToString(make([]byte, 1952))+"\n"), 0o644)
	if out, errs, code := restoreCmd(t, nil, "--data-dir", dir, "--from", b1, "--identity-key-file", other); code == 0 || !strings.Contains(errs, "another identity key") {
		t.Fatalf("restore with another pinned identity: %d\n%s\n%s", code, out, errs)
	}
	// The restore, into the data dir that lost its store (its softhsm/
	// is the HSM), the identity key pinned.
	out, errs, code := restoreCmd(t, nil, "--data-dir", dir, "--from", b1, "--identity-key-file="+filepath.Join(work, "id.pub"))
	if code != 0 {
		t.Fatalf("restore: exit %d\n%s\n%s", code, out, errs)
	}
	var res restoreResult
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if res.Backup != rep.ID || res.AuditSize != rep.Summary.AuditSize+1 || res.Summary.Versions != 6 {
		t.Fatalf("restore result %+v, backup %+v", res, rep)
	}
	// A second restore into the restored data dir is refused and changes
	// nothing.
	before := fileSum(t, filepath.Join(dir, "kms.db"))
	if out, errs, code := restoreCmd(t, nil, "--data-dir", dir, "--from", b1); code == 0 || !strings.Contains(errs, "already holds a kms.db") {
		t.Fatalf("restore into a data dir with a store: exit %d\n%s\n%s", code, out, errs)
	}
	if fileSum(t, filepath.Join(dir, "kms.db")) != before {
		t.Fatal("a refused restore changed kms.db")
	}

	p = start(t, dir, "--audit-checkpoint-interval", "100ms")
	p.waitReady(t)
	runScript(t, p, work, afterRestart)
	c = adminClient(t, p, dir)
	if _, err := c.GetKey(ctx, "after-backup"); client.StatusOf(err) != 404 {
		t.Fatalf("a key made after the backup is there after the restore: %v", err)
	}
	if k, err := c.GetKey(ctx, "e2e-sig"); err != nil || k.LatestVersion != 2 {
		t.Fatalf("e2e-sig after the restore: %+v %v (want latest version 2, as at the backup)", k, err)
	}
	time.Sleep(500 * time.Millisecond)
	out, code = kmsctlOn(t, p, dir, "audit", "verify", "--identity-key-file", filepath.Join(work, "id.pub"), "--saved-checkpoint", filepath.Join(files, "later.cp"))
	if code != 1 || !strings.Contains(out, "rolled back by a restore") || !strings.Contains(out, rep.ID) {
		t.Fatalf("audit verify against a checkpoint saved after the backup: exit %d\n%s", code, out)
	}
	if out, code := kmsctlOn(t, p, dir, "audit", "verify", "--identity-key-file", filepath.Join(work, "id.pub")); code != 0 {
		t.Fatalf("the restored log does not verify: %d %s", code, out)
	}

	// bbolt -> etcd (HE blobs to S3) -> bbolt.
	b2 := filepath.Join(files, "b2.kmsbak")
	if out, code := kmsctlOn(t, p, dir, "backup", "--out", b2); code != 0 {
		t.Fatalf("backup 2: %d %s", code, out)
	}
	stopProc(t, p)
	cl := testetcd.Start(t, 1)
	s3 := tests3.Start(t)
	hsmArgs, hsmEnv := hsmOf(t, dir)
	etcdArgs := append([]string{"--store", "etcd", "--etcd-endpoints", strings.Join(cl.Endpoints(), ","), "--etcd-prefix", "/drill/",
		"--s3-endpoint", s3.Endpoint, "--s3-bucket", s3.Bucket}, hsmArgs...)
	env := append([]string{"AWS_ACCESS_KEY_ID=" + s3.AccessKey, "AWS_SECRET_ACCESS_KEY=" + s3.SecretKey}, hsmEnv...)
	eDir := filepath.Join(t.TempDir(), "etcd-node")
	if out, errs, code := restoreCmd(t, env, append([]string{"--data-dir", eDir, "--from", b2}, etcdArgs...)...); code != 0 {
		t.Fatalf("restore onto etcd: exit %d\n%s\n%s", code, out, errs)
	}
	if out, errs, code := restoreCmd(t, env, append([]string{"--data-dir", eDir, "--from", b2}, etcdArgs...)...); code == 0 || !strings.Contains(errs, "already holds a store") {
		t.Fatalf("restore into an etcd prefix with a store: exit %d\n%s\n%s", code, out, errs)
	}
	pe := startEnv(t, eDir, env, append(etcdArgs, "--audit-checkpoint-interval", "100ms")...)
	pe.waitReady(t)
	os.WriteFile(filepath.Join(eDir, "admin.token"), mustRead(t, filepath.Join(dir, "admin.token")), 0o600)
	runScript(t, pe, work, afterRestart)
	b3 := filepath.Join(files, "b3.kmsbak")
	if out, code := kmsctlOn(t, pe, dir, "backup", "--out", b3); code != 0 {
		t.Fatalf("backup from etcd: %d %s\n%s", code, out, pe.stderr.String())
	}
	stopProc(t, pe)
	bDir := filepath.Join(t.TempDir(), "back-on-bolt")
	if out, errs, code := restoreCmd(t, hsmEnv, append([]string{"--data-dir", bDir, "--from", b3}, hsmArgs...)...); code != 0 {
		t.Fatalf("restore back onto bbolt: exit %d\n%s\n%s", code, out, errs)
	}
	pb := startEnv(t, bDir, hsmEnv, append(hsmArgs, "--audit-checkpoint-interval", "100ms")...)
	pb.waitReady(t)
	os.WriteFile(filepath.Join(bDir, "admin.token"), mustRead(t, filepath.Join(dir, "admin.token")), 0o600)
	runScript(t, pb, work, afterRestart)
	time.Sleep(500 * time.Millisecond)
	if out, code := kmsctlOn(t, pb, dir, "audit", "verify", "--identity-key-file", filepath.Join(work, "id.pub")); code != 0 {
		t.Fatalf("the log after two restores does not verify: %d %s", code, out)
	}
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// killWriter kills kmsd once it has received after bytes.
type killWriter struct {
	w     io.Writer
	n     int
	after int
	p     *proc
}

func (k *killWriter) Write(b []byte) (int, error) {
	k.n += len(b)
	if k.n >= k.after && k.p != nil {
		k.p.cmd.Process.Kill()
		k.p = nil
	}
	return k.w.Write(b)
}

// fillForDrill makes keys of the PQC kinds and an HE key, and returns the
// admin client.
func fillForDrill(t *testing.T, p *proc, dir string, keys int) *client.Client {
	t.Helper()
	c := adminClient(t, p, dir)
	for i := range keys {
		kind := []string{"ml-dsa-65", "ml-kem-768"}[i%2]
		if _, err := c.CreateKey(ctx, client.CreateKeyRequest{Name: fmt.Sprintf("k%04d", i), Kind: kind}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.CreateKey(ctx, client.CreateKeyRequest{Name: "he", Kind: "ckks", Policy: &client.Policy{Params: json.RawMessage(`"ckks-logn13"`), Rotations: []int{1, 2, 4, 8}}}); err != nil {
		t.Fatal(err)
	}
	return c
}

// TestBackupKilledMidway: kmsd killed with SIGKILL while a backup streams
// leaves the client an error and a file every reader refuses (kmsctl
// backup verify, kmsd restore), never one that looks complete.
func TestBackupKilledMidway(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	p := start(t, dir)
	p.waitReady(t)
	c := fillForDrill(t, p, dir, 20)
	// A backup of tens of MiB, more than loopback's socket buffers hold
	// (with seeded HE keys the drill's keys alone fit in them, and the
	// server could finish before the client read 256 KiB and killed it).
	rot := []int{}
	for k := 1; k < 1<<13; k *= 2 {
		rot = append(rot, k)
	}
	if _, op, err := c.CreateKeyOrOperation(ctx, client.CreateKeyRequest{Name: "he-big", Kind: "ckks", Policy: &client.Policy{Params: json.RawMessage(`"ckks-logn14"`), Rotations: rot}}); err != nil {
		t.Fatal(err)
	} else if op != nil {
		if _, err := c.WaitOperation(ctx, op.ID, 100*time.Millisecond, nil); err != nil {
			t.Fatal(err)
		}
	}
	var buf bytes.Buffer
	_, err := c.Backup(ctx, &killWriter{w: &buf, after: 256 << 10, p: p}, true)
	if err == nil {
		t.Fatal("a backup whose server was killed midway reported success")
	}
	if buf.Len() < 256<<10 {
		t.Fatalf("only %d bytes arrived before the kill", buf.Len())
	}
	p.wait(t, 10*time.Second)
	partial := filepath.Join(t.TempDir(), "b.kmsbak.partial")
	if err := os.WriteFile(partial, buf.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := backup.Read(bytes.NewReader(buf.Bytes()), backup.Discard{}); !errors.Is(err, backup.ErrMalformed) {
		t.Fatalf("the bytes of a killed backup read as: %v", err)
	}
	target := filepath.Join(t.TempDir(), "target")
	os.MkdirAll(target, 0o700)
	if err := os.CopyFS(filepath.Join(target, "softhsm"), os.DirFS(filepath.Join(dir, "softhsm"))); err != nil {
		t.Fatal(err)
	}
	if out, errs, code := restoreCmd(t, nil, "--data-dir", target, "--from", partial); code == 0 || !strings.Contains(errs, "cut short") {
		t.Fatalf("restore of a killed backup: exit %d\n%s\n%s", code, out, errs)
	}
	if _, err := os.Stat(filepath.Join(target, "kms.db")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a refused restore left a kms.db: %v", err)
	}
}

// TestRestoreKilledAtRandomPoints: kmsd restore killed with SIGKILL at
// random points leaves a target that is empty (kmsd restore runs again
// and completes) or complete (kmsd starts on it with every key): never
// half a store. On bbolt the store appears by a rename; on etcd a mark
// set first and removed last makes kmsd refuse a prefix a restore did not
// finish, and the next restore replaces it.
func TestRestoreKilledAtRandomPoints(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	p := start(t, dir)
	p.waitReady(t)
	const keys = 300
	fillForDrill(t, p, dir, keys)
	b := filepath.Join(t.TempDir(), "b.kmsbak")
	if out, code := kmsctlOn(t, p, dir, "backup", "--out", b); code != 0 {
		t.Fatalf("backup: %d %s", code, out)
	}
	stopProc(t, p)
	hsmArgs, hsmEnv := hsmOf(t, dir)
	cl := testetcd.Start(t, 1)
	s3 := tests3.Start(t)
	env := append([]string{"AWS_ACCESS_KEY_ID=" + s3.AccessKey, "AWS_SECRET_ACCESS_KEY=" + s3.SecretKey}, hsmEnv...)
	token := mustRead(t, filepath.Join(dir, "admin.token"))
	for _, kind := range []string{"bolt", "etcd"} {
		t.Run(kind, func(t *testing.T) {
			target := filepath.Join(t.TempDir(), "target")
			args := append([]string{"--data-dir", target}, hsmArgs...)
			if kind == "etcd" {
				args = append(args, "--store", "etcd", "--etcd-endpoints", strings.Join(cl.Endpoints(), ","), "--etcd-prefix", "/killed/",
					"--s3-endpoint", s3.Endpoint, "--s3-bucket", s3.Bucket)
			}
			// complete checks the target holds the whole store, then
			// empties it for the next round (wipe).
			var wipe func()
			complete := func(round int) {
				q := startEnv(t, target, env, append(args, "--insecure-http")...)
				q.waitReady(t)
				os.WriteFile(filepath.Join(target, "admin.token"), token, 0o600)
				c := adminClient(t, q, target)
				n := 0
				for page := ""; ; {
					l, err := c.ListKeys(ctx, 1000, page)
					if err != nil {
						t.Fatalf("round %d: %v\n%s", round, err, q.stderr.String())
					}
					n += len(l.Keys)
					if page = l.NextPageToken; page == "" {
						break
					}
				}
				if n != keys+1 {
					t.Fatalf("round %d: the restored store lists %d keys, want %d", round, n, keys+1)
				}
				stopProc(t, q)
				wipe()
			}
			wipe = func() {
				if kind == "bolt" {
					os.Remove(filepath.Join(target, "kms.db"))
					os.Remove(filepath.Join(target, "kms.db-audit-wal"))
				} else {
					ec, err := clientv3.New(clientv3.Config{Endpoints: cl.Endpoints(), DialTimeout: 5 * time.Second})
					if err != nil {
						t.Fatal(err)
					}
					_, err = ec.Delete(ctx, "/killed/", clientv3.WithPrefix())
					ec.Close()
					if err != nil {
						t.Fatal(err)
					}
				}
			}
			t0 := time.Now()
			if out, errs, code := restoreCmd(t, env, append(args, "--from", b)...); code != 0 {
				t.Fatalf("restore: %d\n%s\n%s", code, out, errs)
			}
			took := time.Since(t0)
			complete(0)
			empty, whole, refused := 0, 0, 0
			for round := 1; round <= 12; round++ {
				cmd := exec.Command(kmsdBin, append([]string{"restore", "--from", b}, args...)...)
				// The killed restore gets a copy of the SoftHSM token:
				// twice under full-suite load, after a restore was killed,
				// the next kmsd found no token with that label (the cause
				// is not known: 200 kills during pkcs11-tool logins did not
				// reproduce it); the token's durability under kill -9 is
				// not what this test of the store's restore is about, and
				// is recorded for the HSM work.
				cmd.Env = append(append(append(os.Environ(), "SOFTHSM2_CONF=/nonexistent"), env...), softhsmCopy(t, dir))
				if err := cmd.Start(); err != nil {
					t.Fatal(err)
				}
				time.Sleep(time.Duration(mrand.Int64N(int64(took))))
				cmd.Process.Kill()
				cmd.Wait()
				switch kind {
				case "bolt":
					if _, err := os.Stat(filepath.Join(target, "kms.db")); err == nil {
						whole++
						complete(round)
						continue
					}
				case "etcd":
					q := startEnv(t, target, env, append(args, "--insecure-http")...)
					if readyOrExit(t, q) {
						q.cmd.Process.Kill()
						q.wait(t, 10*time.Second)
						if strings.Contains(q.stderr.String(), `"new_data_dir":true`) {
							// Killed before it wrote anything: kmsd
							// took the prefix for a new one.
							wipe()
						} else {
							whole++
							complete(round)
							continue
						}
					} else if !strings.Contains(q.stderr.String(), "did not finish") {
						t.Fatalf("round %d: kmsd on a killed restore's prefix:\n%s", round, q.stderr.String())
					} else {
						refused++
					}
				}
				empty++
				if out, errs, code := restoreCmd(t, env, append(args, "--from", b)...); code != 0 {
					t.Fatalf("round %d: restore after a killed one: %d\n%s\n%s", round, code, out, errs)
				}
				complete(round)
			}
			t.Logf("%s: restore takes %v; of 12 kills, %d left an empty target (%d of them marked unfinished, which kmsd refused), %d a complete one", kind, took.Round(time.Millisecond), empty, refused, whole)
		})
	}
}

// readyOrExit waits until kmsd is ready (true) or exits (false).
func readyOrExit(t *testing.T, p *proc) bool {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case err := <-p.done:
			p.done <- err
			return false
		default:
		}
		if c, err := p.client(t, ""); err == nil && c.Ready(ctx) == nil {
			return true
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("kmsd neither ready nor gone in 30 s\n%s", p.stderr.String())
	return false
}

// TestRestoreResumesFromArchive: with --audit-archive, kmsd restore reads
// the log back from the archive up to its newest checkpoint, so a
// checkpoint saved after the backup still verifies (no fork), lists the
// state changes the restored store lacks, and kmsd archives on from
// there.
func TestRestoreResumesFromArchive(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	arch := filepath.Join(t.TempDir(), "archive")
	files := t.TempDir()
	args := []string{"--audit-archive", arch, "--audit-checkpoint-interval", "100ms", "--audit-checkpoint-every", "16"}
	p := start(t, dir, args...)
	p.waitReady(t)
	c := adminClient(t, p, dir)
	if _, err := c.CreateKey(ctx, client.CreateKeyRequest{Name: "kept", Kind: "ml-dsa-65"}); err != nil {
		t.Fatal(err)
	}
	old, err := c.CreateToken(ctx, client.CreateTokenRequest{Role: "worker", Keys: []string{"kept"}})
	if err != nil {
		t.Fatal(err)
	}
	b := filepath.Join(files, "b.kmsbak")
	if out, code := kmsctlOn(t, p, dir, "backup", "--out", b); code != 0 {
		t.Fatalf("backup: %d %s", code, out)
	}
	if _, err := c.RevokeToken(ctx, old.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Rotate(ctx, "kept"); err != nil {
		t.Fatal(err)
	}
	tok, err := c.CreateToken(ctx, client.CreateTokenRequest{Role: "worker", Keys: []string{"kept"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.RevokeToken(ctx, tok.ID); err != nil {
		t.Fatal(err)
	}
	for range 40 {
		if _, err := c.GetKey(ctx, "kept"); err != nil {
			t.Fatal(err)
		}
	}
	id := mustIdentity(t, c)
	idFile := filepath.Join(files, "id.pub")
	os.WriteFile(idFile, []byte(base64.StdEncoding.EncodeToString(id)+"\n"), 0o644)
	time.Sleep(300 * time.Millisecond)
	if out, code := kmsctlOn(t, p, dir, "audit", "verify", "--identity-key-file", idFile, "--save-checkpoint", filepath.Join(files, "later.cp")); code != 0 {
		t.Fatalf("verify: %d %s", code, out)
	}
	saved, _ := archive.CheckpointSize(mustRead(t, filepath.Join(files, "later.cp")))
	waitArchived(t, p, arch, saved)
	stopProc(t, p)
	os.Rename(filepath.Join(dir, "kms.db"), filepath.Join(files, "lost.db"))
	os.Remove(filepath.Join(dir, "kms.db-audit-wal"))

	out, errs, code := restoreCmd(t, nil, append([]string{"--data-dir", dir, "--from", b}, args...)...)
	if code != 0 {
		t.Fatalf("restore: %d\n%s\n%s", code, out, errs)
	}
	var res restoreResult
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatal(err)
	}
	if res.ArchiveSize < saved || res.AuditSize != res.ArchiveSize+2 { // the restore record, the revocation again
		t.Fatalf("restore result %+v, the archive covered %d", res, saved)
	}
	lost := strings.Join(res.LostChanges, "\n")
	for _, want := range []string{"POST /v1/keys/{name}/rotate key=kept", "POST /v1/tokens token=" + tok.ID, "DELETE /v1/tokens/{id} token=" + tok.ID} {
		if !strings.Contains(lost, want) {
			t.Fatalf("lost changes lack %q:\n%s", want, lost)
		}
	}
	p = start(t, dir, args...)
	p.waitReady(t)
	c = adminClient(t, p, dir)
	if k, err := c.GetKey(ctx, "kept"); err != nil || k.LatestVersion != 1 {
		t.Fatalf("the restored key: %+v %v", k, err)
	}
	// A token the backup holds and that was revoked after it stays
	// revoked; one made after the backup is not there.
	oc, err := p.client(t, old.Token)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := oc.GetKey(ctx, "kept"); client.StatusOf(err) != 401 {
		t.Fatalf("a token revoked after the backup works after the restore: %v", err)
	}
	if !strings.Contains(errs, "revoked again a token") {
		t.Fatalf("restore did not say it revoked the token again:\n%s", errs)
	}
	if _, err := c.GetToken(ctx, tok.ID); client.StatusOf(err) != 404 {
		t.Fatalf("a token made after the backup: %v", err)
	}
	time.Sleep(300 * time.Millisecond)
	if out, code := kmsctlOn(t, p, dir, "audit", "verify", "--identity-key-file", idFile, "--saved-checkpoint", filepath.Join(files, "later.cp")); code != 0 {
		t.Fatalf("a checkpoint saved before the restore does not verify against the log after it: %d %s", code, out)
	}
	waitArchived(t, p, arch, res.AuditSize)
	if out, code := kmsctlOn(t, p, dir, "audit", "verify", "--identity-key-file", idFile, "--archive", arch, "--saved-checkpoint", filepath.Join(files, "later.cp")); code != 0 {
		t.Fatalf("the archive after the restore: %d %s", code, out)
	}
	if strings.Contains(p.stderr.String(), "rolled back") || strings.Contains(p.stderr.String(), `"level":"ERROR"`) {
		t.Fatalf("kmsd after a restore from the archive:\n%s", p.stderr.String())
	}
}
