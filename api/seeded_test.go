package api_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kmsd-project/kmsd/api"
	"github.com/kmsd-project/kmsd/api/client/hekeys"
	"github.com/kmsd-project/kmsd/kms"
)

// TestSeededKeys (issue 26): a new HE version's keys are stored and
// served seeded, at most 51% of their full size; the manifest names each
// one's full form, which ?form=full serves (Range too) and the SDK's
// expansion gives byte for byte; a blob changed in the store is refused
// by the server and by the SDK.
func TestSeededKeys(t *testing.T) {
	e := newEnv(t)
	heKey(t, e, "he1", `{"name":"he1","kind":"ckks","policy":{"params":"ckks-logn13","rotations":[1,2],"relinearization":true}}`)
	heKey(t, e, "bgv1", `{"name":"bgv1","kind":"bgv","policy":{"params":"bgv-logn13","rotations":[1]}}`)
	for _, name := range []string{"he1", "bgv1"} {
		_, _, man := e.raw("GET", "/v1/keys/"+name+"/versions/primary/evaluation-keys", e.admin, "", "")
		var m kms.Manifest
		if err := json.Unmarshal(man, &m); err != nil {
			t.Fatal(err)
		}
		var stored, full int64
		for _, ref := range m.Blobs() {
			if ref.Form != "seeded" || !strings.HasPrefix(ref.FullDigest, "sha256:") || ref.FullSize <= ref.Size {
				t.Fatalf("%s: a blob of a new version is not seeded: %+v", name, ref)
			}
			stored, full = stored+ref.Size, full+ref.FullSize
			h := strings.TrimPrefix(ref.Digest, "sha256:")
			st, hd, body := e.raw("GET", "/v1/blobs/sha256/"+h+"?form=full", e.admin, "", "")
			sum := sha256.Sum256(body)
			if st != 200 || int64(len(body)) != ref.FullSize || "sha256:"+hex.EncodeToString(sum[:]) != ref.FullDigest || hd.Get("ETag") != `"`+ref.FullDigest+`"` {
				t.Fatalf("%s ?form=full: %d, %d bytes, ETag %s", name, st, len(body), hd.Get("ETag"))
			}
			req, _ := http.NewRequest("GET", e.url+"/v1/blobs/sha256/"+h+"?form=full", nil)
			req.Header.Set("Authorization", "Bearer "+e.admin)
			req.Header.Set("Range", "bytes=1000-1099")
			resp, err := e.httpc.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			part := new(bytes.Buffer)
			part.ReadFrom(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 206 || !bytes.Equal(part.Bytes(), body[1000:1100]) {
				t.Fatalf("%s ?form=full with Range: %d, %d bytes", name, resp.StatusCode, part.Len())
			}
		}
		if r := float64(stored) / float64(full); r > 0.51 {
			t.Fatalf("%s: seeded keyset is %.3f of the full one", name, r)
		}
	}
	if st, _, _ := e.raw("GET", "/v1/blobs/sha256/"+strings.Repeat("0", 64)+"?form=compressed", e.admin, "", ""); st != 404 && st != 400 {
		t.Fatalf("an unknown form: %d", st)
	}

	// The SDK expands to what ?form=full serves.
	f := &hekeys.Fetcher{BaseURL: e.url, Token: e.admin, IdentityKey: e.idPub, CacheDir: t.TempDir(), HTTP: e.httpc}
	keys, err := f.Fetch(ctx, "he1", 1)
	if err != nil {
		t.Fatal(err)
	}
	pk, _ := keys.PublicKey.MarshalBinary()
	sum := sha256.Sum256(pk)
	if "sha256:"+hex.EncodeToString(sum[:]) != keys.Manifest.PublicKey.FullDigest {
		t.Fatal("the SDK's public key is not the manifest's full form")
	}
	// A seeded blob changed in the store: the server refuses it (its
	// digest), and so does the SDK from a cache it finds changed.
	ref := keys.Manifest.GaloisKeys[0]
	h := strings.TrimPrefix(ref.Digest, "sha256:")
	path := filepath.Join(e.blobsDir(), h)
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	b[60] ^= 1 // in the seed
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if st, _, body := e.raw("GET", "/v1/blobs/sha256/"+h+"?form=full", e.admin, "", ""); st != 500 || !strings.Contains(string(body), api.ProblemBase+api.ProbBlobCorrupt) {
		t.Fatalf("a changed seeded blob, ?form=full: %d %s", st, body)
	}
	f2 := &hekeys.Fetcher{BaseURL: e.url, Token: e.admin, IdentityKey: e.idPub, CacheDir: t.TempDir(), HTTP: e.httpc}
	if _, err := f2.Fetch(ctx, "he1", 1); err == nil {
		t.Fatal("the SDK took a changed seeded blob")
	}
}
