package s3blobs_test

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/kmsd-project/kmsd/he"
	"github.com/kmsd-project/kmsd/he/blobtest"
	"github.com/kmsd-project/kmsd/he/s3blobs"
	"github.com/kmsd-project/kmsd/internal/tests3"
)

func open(t *testing.T, srv *tests3.Server, prefix string) *s3blobs.Store {
	t.Helper()
	return openSpool(t, srv, prefix, filepath.Join(t.TempDir(), "spool"))
}

func openSpool(t *testing.T, srv *tests3.Server, prefix, spool string) *s3blobs.Store {
	t.Helper()
	s, err := s3blobs.Open(context.Background(), s3blobs.Config{Endpoint: srv.Endpoint, Bucket: srv.Bucket, Prefix: prefix,
		AccessKeyID: srv.AccessKey, SecretAccessKey: srv.SecretKey, SpoolDir: spool})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestConformance runs the blob suite against a real versitygw; each
// subtest gets a prefix of its own in one bucket.
func TestConformance(t *testing.T) {
	srv := tests3.Start(t)
	n := 0
	blobtest.Run(t, func(t *testing.T) he.Blobs {
		n++
		return open(t, srv, "run"+string(rune('a'+n))+"/")
	})
}

// TestForeignObjectsLeftAlone: objects under the prefix whose names are not
// digests, and objects outside it, survive RemoveOrphans.
func TestForeignObjectsLeftAlone(t *testing.T) {
	srv := tests3.Start(t)
	c := srv.Client(t)
	ctx := context.Background()
	for _, name := range []string{"kmsd/blobs/README", "other/" + strings.Repeat("a", 64)} {
		if _, err := c.PutObject(ctx, srv.Bucket, name, strings.NewReader("x"), 1, minio.PutObjectOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	s := open(t, srv, "")
	if _, _, err := he.Put(ctx, s, func(w io.Writer) error { _, err := io.WriteString(w, "orphan"); return err }); err != nil {
		t.Fatal(err)
	}
	if n, err := s.RemoveOrphans(ctx, nil, time.Now().Add(time.Hour)); err != nil || n != 1 {
		t.Fatalf("RemoveOrphans = %d, %v; want 1", n, err)
	}
	for _, name := range []string{"kmsd/blobs/README", "other/" + strings.Repeat("a", 64)} {
		if _, err := c.StatObject(ctx, srv.Bucket, name, minio.StatObjectOptions{}); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
	}
}

// TestOpenRefusals: a missing bucket, wrong credentials and endpoints kmsd
// must not send credentials to stop Open with a clear error, and no error
// echoes a secret.
func TestOpenRefusals(t *testing.T) {
	srv := tests3.Start(t)
	spool := filepath.Join(t.TempDir(), "spool")
	good := s3blobs.Config{Endpoint: srv.Endpoint, Bucket: srv.Bucket, AccessKeyID: srv.AccessKey, SecretAccessKey: srv.SecretKey, SpoolDir: spool}
	for _, tc := range []struct {
		name string
		edit func(*s3blobs.Config)
		want string
	}{
		{"no bucket", func(c *s3blobs.Config) { c.Bucket = "absent" }, "does not exist"},
		{"wrong secret", func(c *s3blobs.Config) { c.SecretAccessKey = "wrong-secret-zz" }, "bucket"},
		{"no credentials", func(c *s3blobs.Config) { c.AccessKeyID = "" }, "credentials are required"},
		{"plain http off loopback", func(c *s3blobs.Config) { c.Endpoint = "http://s3.example.com" }, "loopback"},
		{"credentials in the URL", func(c *s3blobs.Config) { c.Endpoint = "https://key:hunter2@s3.example.com" }, "credentials in the URL"},
		{"a path", func(c *s3blobs.Config) { c.Endpoint = srv.Endpoint + "/bucket" }, "no path"},
		{"ftp", func(c *s3blobs.Config) { c.Endpoint = "ftp://127.0.0.1" }, "want https"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := good
			tc.edit(&cfg)
			_, err := s3blobs.Open(context.Background(), cfg)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Open = %v, want an error with %q", err, tc.want)
			}
			for _, secret := range []string{"hunter2", "wrong-secret-zz", srv.SecretKey} {
				if strings.Contains(err.Error(), secret) {
					t.Fatalf("the error echoes a secret: %v", err)
				}
			}
		})
	}
	if _, err := s3blobs.Open(context.Background(), good); err != nil {
		t.Fatalf("the good settings: %v", err)
	}
}

// TestServerDown: with the server gone, a commit and an open fail with an
// error, and the spool file is removed all the same.
func TestServerDown(t *testing.T) {
	srv := tests3.Start(t)
	spool := filepath.Join(t.TempDir(), "spool")
	s := openSpool(t, srv, "", spool)
	ctx := context.Background()
	d, _, err := he.Put(ctx, s, func(w io.Writer) error { _, err := io.WriteString(w, "before"); return err })
	if err != nil {
		t.Fatal(err)
	}
	srv.Stop()
	st, err := s.Stage(func(w io.Writer) error { _, err := io.WriteString(w, "during"); return err })
	if err != nil {
		t.Fatal(err)
	}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := s.Commit(cctx, st); err == nil {
		t.Fatal("a commit with the server down succeeded")
	}
	if _, err := s.Open(cctx, d); err == nil || errors.Is(err, he.ErrBlobNotFound) {
		t.Fatalf("Open with the server down = %v, want an error that is not ErrBlobNotFound", err)
	}
	if ents, err := os.ReadDir(spool); err != nil || len(ents) != 0 {
		t.Fatalf("spool after a failed commit: %d files, %v; want none", len(ents), err)
	}
}

// TestVersionChangesWithTheObject: an opened blob says its version
// (he.Versioned), and an object rewritten in the bucket (a byte flipped by
// whoever can write there) has another, so that kmsd checks its digest
// again before serving it.
func TestVersionChangesWithTheObject(t *testing.T) {
	srv := tests3.Start(t)
	ctx := context.Background()
	s := open(t, srv, "")
	d, _, err := he.Put(ctx, s, func(w io.Writer) error { _, err := io.WriteString(w, "public key bytes"); return err })
	if err != nil {
		t.Fatal(err)
	}
	version := func() string {
		t.Helper()
		f, err := s.Open(ctx, d)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		v, ok := f.(he.Versioned)
		if !ok || v.BlobVersion() == "" {
			t.Fatalf("an opened blob has no version: %T", f)
		}
		return v.BlobVersion()
	}
	v1 := version()
	if v2 := version(); v2 != v1 {
		t.Fatalf("the version of an unchanged object changed: %q, %q", v1, v2)
	}
	h, _ := d.Hex()
	if _, err := srv.Client(t).PutObject(ctx, srv.Bucket, "kmsd/blobs/"+h, strings.NewReader("public key bytez"), 16, minio.PutObjectOptions{}); err != nil {
		t.Fatal(err)
	}
	if v3 := version(); v3 == v1 {
		t.Fatalf("a rewritten object kept its version %q", v1)
	}
}
