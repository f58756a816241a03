package app

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"path/filepath"
	"testing"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/internal/testhsm"
	"github.com/kmsd-project/kmsd/internal/testutil"
	"github.com/kmsd-project/kmsd/store/backup"
	"github.com/kmsd-project/kmsd/store/bolt"
)

// TestBackupOnlyForAdminOverAll: GET /v1/backup answers a backup to an
// admin token over "*" only; an admin over some keys, a worker over all
// and no token get a problem and no byte of a backup; a bad query is 400.
func TestBackupOnlyForAdminOverAll(t *testing.T) {
	ctx := context.Background()
	st, err := bolt.Open(filepath.Join(t.TempDir(), "kms.db"), bolt.Options{Sealer: testhsm.Open(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	var admin string
	a, err := New(ctx, Config{Store: st, AuditStore: st.Audit(), Sealer: testhsm.Open(t), BlobDir: filepath.Join(t.TempDir(), "blobs"),
		AdminToken: func(tok string) error { admin = tok; return nil }})
	if err != nil {
		t.Fatal(err)
	}
	a.Start()
	defer a.Close()
	srv, ca := testutil.TLSServer(t, a.Handler())
	cfg, err := client.TLSConfig(ca, "", "")
	if err != nil {
		t.Fatal(err)
	}
	as := func(tok string) *client.Client {
		c, err := client.New(srv.URL, tok, client.WithTLS(cfg))
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	root := as(admin)
	some, err := root.CreateToken(ctx, client.CreateTokenRequest{Role: "admin", Keys: []string{"team-*"}})
	if err != nil {
		t.Fatal(err)
	}
	worker, err := root.CreateToken(ctx, client.CreateTokenRequest{Role: "worker", Keys: []string{"*"}})
	if err != nil {
		t.Fatal(err)
	}
	for name, tok := range map[string]string{"admin over team-*": some.Token, "worker over *": worker.Token, "no token": ""} {
		var buf bytes.Buffer
		_, err := as(tok).Backup(ctx, &buf, true)
		if s := client.StatusOf(err); (tok == "" && s != 401) || (tok != "" && s != 403) || buf.Len() != 0 {
			t.Errorf("%s: status %d, %d bytes, %v", name, s, buf.Len(), err)
		}
	}
	req, _ := http.NewRequest(http.MethodGet, srv.URL+"/v1/backup?blobs=maybe", nil)
	req.Header.Set("Authorization", "Bearer "+admin)
	resp, err := root.HTTPClient().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 400 || !bytes.Contains(body, []byte("blobs must be true or false")) {
		t.Fatalf("blobs=maybe: %d %s", resp.StatusCode, body)
	}
	var buf bytes.Buffer
	id, err := root.Backup(ctx, &buf, false)
	if err != nil {
		t.Fatal(err)
	}
	f, err := backup.Read(bytes.NewReader(buf.Bytes()), backup.Discard{})
	if err != nil || f.ID != id || backup.Verify(f) != nil || backup.BindHSM(ctx, testhsm.Open(t), f) != nil {
		t.Fatalf("the backup: %v (id %s, trailer says %s)", err, f.ID, id)
	}
	// The admin token and the two made here; the identity key.
	if f.Summary.Tokens != 3 || f.Summary.Keys != 1 || f.Header.WithBlobs || f.Header.Store != "bolt" {
		t.Fatalf("backup of %+v %+v", f.Header, f.Summary)
	}
	if v, pub, _ := a.Service.Identity(ctx); f.Trailer.IdentityVersion != v || !bytes.Equal(f.Identity[v].PublicKey, pub) {
		t.Fatalf("signed by identity version %d", f.Trailer.IdentityVersion)
	}
}
