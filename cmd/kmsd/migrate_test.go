package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/base64"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cloudflare/circl/kem/mlkem/mlkem768"

	"github.com/kmsd-project/kmsd/api/client"
)

// TestMigratesDataDirOfSchema1: a data dir made by kmsd before versions
// were records of their own (testdata/v1-datadir.tar.gz, made by
// make-v1-datadir.sh with the binaries of commit bf1bdf3) starts, is
// migrated once, and everything in it works as before: the same token,
// the versions with their states, the old signature verifies, the old
// seeds unseal (sign with the primary, decapsulate with the KEM key), the
// audit log continues and verifies, and a second start migrates nothing.
func TestMigratesDataDirOfSchema1(t *testing.T) {
	dir := t.TempDir()
	untar(t, "testdata/v1-datadir.tar.gz", dir)
	data := filepath.Join(dir, "data")
	// The SoftHSM config names its token directory by absolute path: point
	// it at the copy, as an operator moving a data dir would.
	conf := filepath.Join(data, "softhsm", "softhsm2.conf")
	b, err := os.ReadFile(conf)
	if err != nil {
		t.Fatal(err)
	}
	b = regexp.MustCompile(`(?m)^directories\.tokendir = .*$`).ReplaceAll(b, []byte("directories.tokendir = "+filepath.Join(data, "softhsm", "tokens")))
	if err := os.WriteFile(conf, b, 0o600); err != nil {
		t.Fatal(err)
	}
	sigB64, err := os.ReadFile(filepath.Join(data, "sig-v1.b64"))
	if err != nil {
		t.Fatal(err)
	}
	sigV1, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(sigB64)))
	if err != nil {
		t.Fatal(err)
	}

	// Records without tags: refused unless the operator asks for the
	// upgrade (a forged file looks the same), and nothing changed.
	exitsWith(t, data, "--upgrade-untagged-store")
	p := start(t, data, "--upgrade-untagged-store")
	p.waitReady(t)
	if !strings.Contains(p.stderr.String(), `"msg":"kms.db migrated`) || !strings.Contains(p.stderr.String(), `"keys":3,"versions":5`) {
		t.Fatalf("no migration logged (want 3 keys, 5 versions: sig 3, kem 1, the identity key 1):\n%s", p.stderr.String())
	}
	c := adminClient(t, p, data)
	k, err := c.GetKey(ctx, "sig")
	if err != nil {
		t.Fatal(err)
	}
	if k.LatestVersion != 3 || k.PrimaryVersion != 3 || len(k.Versions) != 3 || k.Versions[0].Version != 3 || k.Versions[1].State != "disabled" || k.Versions[2].State != "enabled" {
		t.Fatalf("key sig after migration: %+v", k)
	}
	if ok, err := c.Verify(ctx, "sig", 1, []byte("fixture message"), sigV1, nil); err != nil || !ok {
		t.Fatalf("the signature made before migration: %v %v", ok, err)
	}
	if _, err := c.Verify(ctx, "sig", 2, []byte("fixture message"), sigV1, nil); !client.IsProblem(err, "failed-precondition") {
		t.Fatalf("verify with the disabled version 2: %v", err)
	}
	s, err := c.Sign(ctx, "sig", []byte("after"), nil)
	if err != nil || s.Version != 3 {
		t.Fatalf("sign after migration: %+v %v", s, err)
	}
	pub, err := c.PublicKey(ctx, "kem", 1)
	if err != nil {
		t.Fatal(err)
	}
	pk, err := mlkem768.Scheme().UnmarshalBinaryPublicKey(pub.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	ct, ss, err := mlkem768.Scheme().Encapsulate(pk)
	if err != nil {
		t.Fatal(err)
	}
	got, err := c.Decapsulate(ctx, "kem", 1, ct)
	if err != nil || !bytes.Equal(got.SharedSecret, ss) {
		t.Fatalf("decapsulate with a version sealed before migration: %v", err)
	}
	v, err := c.Rotate(ctx, "sig")
	if err != nil || v.Version != 4 {
		t.Fatalf("rotate after migration: %+v %v", v, err)
	}

	p.cmd.Process.Signal(syscall.SIGTERM)
	if code := p.wait(t, 15*time.Second); code != 0 {
		t.Fatalf("exit %d\n%s", code, p.stderr.String())
	}
	p2 := start(t, data)
	p2.waitReady(t)
	if strings.Contains(p2.stderr.String(), "migrated") {
		t.Fatal("the second start migrated again")
	}
	c2 := adminClient(t, p2, data)
	if k, err := c2.GetKey(ctx, "sig"); err != nil || k.LatestVersion != 4 {
		t.Fatalf("after restart: %+v %v", k, err)
	}
	// The checkpoint signed at start covers the records of both runs.
	res, recs := verifyLog(t, c2)
	if !hasRecord(recs, op{"POST /v1/keys", "sig", 1, 201}) || !hasRecord(recs, op{"POST /v1/keys/{name}/rotate", "sig", 4, 201}) {
		t.Fatalf("the audit log does not hold both the records from before and after the migration (%d records)", res.Size)
	}
}

// untar unpacks a .tar.gz of directories and regular files into dir,
// keeping the modes (kmsd checks that its secrets are 0600).
func untar(t *testing.T, archive, dir string) {
	t.Helper()
	f, err := os.Open(archive)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(zr)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(dir, h.Name)
		if !strings.HasPrefix(path, dir+string(filepath.Separator)) {
			t.Fatalf("%s: entry %q leaves the directory", archive, h.Name)
		}
		switch h.Typeflag {
		case tar.TypeDir:
			err = os.MkdirAll(path, h.FileInfo().Mode().Perm())
		case tar.TypeReg:
			var b []byte
			if b, err = io.ReadAll(tr); err == nil {
				err = os.WriteFile(path, b, h.FileInfo().Mode().Perm())
			}
		default:
			t.Fatalf("%s: unexpected entry %q", archive, h.Name)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
}
