package api_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/tuneinsight/lattigo/v6/core/rlwe"
	"github.com/tuneinsight/lattigo/v6/schemes/ckks"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/kms"
)

// reviewManifest creates an HE key and returns its manifest.
func reviewManifest(t *testing.T, e *env, name, body string) kms.Manifest {
	t.Helper()
	heKey(t, e, name, body)
	st, _, raw := e.raw("GET", "/v1/keys/"+name+"/versions/primary/evaluation-keys", e.admin, "", "")
	var m kms.Manifest
	if st != 200 || json.Unmarshal(raw, &m) != nil {
		t.Fatalf("manifest: %d %s", st, raw)
	}
	return m
}

// slowFullReaders starts n GETs of ?form=full of blob h whose bodies are
// never read (a slow or stalled client), and returns once their headers
// have arrived. The bodies are closed at the end of the test.
func slowFullReaders(t *testing.T, e *env, token, h string, n int) {
	t.Helper()
	for i := 0; i < n; i++ {
		req, _ := http.NewRequest("GET", e.url+"/v1/blobs/sha256/"+h+"?form=full", nil)
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := testTransport.RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { resp.Body.Close() })
		if resp.StatusCode != 200 {
			t.Fatalf("slow reader %d: %d", i, resp.StatusCode)
		}
	}
	time.Sleep(300 * time.Millisecond) // the handlers fill the socket buffers and block
}

// A logN 15 Galois key is 30 MiB in full, more than loopback's socket
// buffers hold, so a handler serving it to a client that does not read
// blocks in its write.
const reviewBigKey = `{"name":"big","kind":"ckks","policy":{"params":"ckks-logn15","rotations":[1]}}`

// TestFormFullSlowReadersDoNotStarveOthers (from an outside review): two
// clients that ask ?form=full and do not read held both expansion slots
// for as long as they kept their connections, and every other ?form=full
// answered 503; an expansion slot is now held while the key is expanded
// only (the answers being written have slots of their own, and each write
// 30 s).
func TestFormFullSlowReadersDoNotStarveOthers(t *testing.T) {
	e := newEnv(t)
	m := reviewManifest(t, e, "big", reviewBigKey)
	gal := strings.TrimPrefix(m.GaloisKeys[0].Digest, "sha256:")
	slowFullReaders(t, e, e.admin, gal, 2)

	// Another client, another blob: the public key of another key.
	m2 := reviewManifest(t, e, "small", `{"name":"small","kind":"ckks","policy":{"params":"ckks-logn13"}}`)
	st, _, body := e.raw("GET", "/v1/blobs/sha256/"+strings.TrimPrefix(m2.PublicKey.Digest, "sha256:")+"?form=full", e.admin, "", "")
	if st != 200 {
		t.Fatalf("?form=full while two slow clients read theirs: %d %s", st, body)
	}
}

// TestFormFullConditionalAndHeadFromManifest (from an outside review):
// HEAD and a matching If-None-Match on ?form=full are answered from the
// signed manifest, without an expansion (they waited for a slot, and
// expanded the key, while two slow readers held the slots).
func TestFormFullConditionalAndHeadFromManifest(t *testing.T) {
	e := newEnv(t)
	m := reviewManifest(t, e, "big", reviewBigKey)
	slowFullReaders(t, e, e.admin, strings.TrimPrefix(m.GaloisKeys[0].Digest, "sha256:"), 2)

	pub := m.PublicKey
	url := e.url + "/v1/blobs/sha256/" + strings.TrimPrefix(pub.Digest, "sha256:") + "?form=full"
	req, _ := http.NewRequest("GET", url, nil)
	req.Header.Set("Authorization", "Bearer "+e.admin)
	req.Header.Set("If-None-Match", `"`+pub.FullDigest+`"`)
	resp, err := e.httpc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 304 {
		t.Errorf("If-None-Match with the full digest: %d, want 304 without an expansion", resp.StatusCode)
	}
	req, _ = http.NewRequest("HEAD", url, nil)
	req.Header.Set("Authorization", "Bearer "+e.admin)
	resp, err = e.httpc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.ContentLength != pub.FullSize || resp.Header.Get("ETag") != `"`+pub.FullDigest+`"` {
		t.Errorf("HEAD ?form=full: %d, length %d, ETag %s; want 200, %d, the full digest, without an expansion", resp.StatusCode, resp.ContentLength, resp.Header.Get("ETag"), pub.FullSize)
	}
}

// TestOldSDKRefusedSeededBlob (from an outside review): an SDK older than
// seeded keys fetches a blob by its digest and decodes it as a full key,
// which on a seeded blob panicked (and killed an old kmsd-mcp). A plain
// GET of a seeded blob is now 406: only a client that asks ?form=seeded
// gets it.
func TestOldSDKRefusedSeededBlob(t *testing.T) {
	e := newEnv(t)
	m := reviewManifest(t, e, "he1", `{"name":"he1","kind":"ckks","policy":{"params":"ckks-logn13","rotations":[1],"relinearization":true}}`)
	lit, _ := m.Literal()
	var params ckks.Parameters
	if err := params.UnmarshalJSON(lit); err != nil {
		t.Fatal(err)
	}
	for what, c := range map[string]struct {
		digest string
		dst    interface{ UnmarshalBinary([]byte) error }
	}{
		"public":          {m.PublicKey.Digest, rlwe.NewPublicKey(params)},
		"relinearization": {m.RelinearizationKey.Digest, rlwe.NewRelinearizationKey(params)},
		"galois":          {m.GaloisKeys[0].Digest, rlwe.NewGaloisKey(params)},
	} {
		// What the old SDK sends: a plain GET of the blob by its digest.
		st, _, data := e.raw("GET", "/v1/blobs/sha256/"+strings.TrimPrefix(c.digest, "sha256:"), e.admin, "", "")
		if st == 406 {
			continue // refused cleanly: an old client gets a problem, not bytes it cannot parse
		}
		err := func() (err error) {
			defer func() {
				if r := recover(); r != nil {
					err = fmt.Errorf("panic: %v", r)
				}
			}()
			if err := c.dst.UnmarshalBinary(data); err != nil {
				return nil // an error is a clean failure
			}
			return fmt.Errorf("decoded a seeded blob as a full key")
		}()
		if err != nil {
			t.Errorf("%s key, as the pre-seeded SDK decodes it: %v", what, err)
		}
	}
}

// TestFormFullAuthorizedAndAudited: ?form=full is refused
// (404, as the plain blob) to a token of other keys, served to the key's
// worker, and every answer has its audit record naming the key.
func TestFormFullAuthorizedAndAudited(t *testing.T) {
	e := newEnv(t)
	m := reviewManifest(t, e, "he1", `{"name":"he1","kind":"ckks","policy":{"params":"ckks-logn13","rotations":[1]}}`)
	other, _ := e.client(e.admin).CreateToken(ctx, client.CreateTokenRequest{Role: "worker", Keys: []string{"team-b-*"}})
	mine, _ := e.client(e.admin).CreateToken(ctx, client.CreateTokenRequest{Role: "worker", Keys: []string{"he*"}})
	path := "/v1/blobs/sha256/" + strings.TrimPrefix(m.GaloisKeys[0].Digest, "sha256:") + "?form=full"
	ids := map[string]int{}
	for _, c := range []struct {
		token string
		want  int
	}{{other.Token, 404}, {mine.Token, 200}, {"", 401}} {
		st, h, body := e.raw("GET", path, c.token, "", "")
		if st != c.want {
			t.Fatalf("?form=full: %d %s, want %d", st, body, c.want)
		}
		ids[h.Get("X-Request-Id")] = st
	}
	seen := 0
	for _, line := range e.auditLog() {
		r, err := kms.DecodeAuditRecord(line)
		if err != nil {
			t.Fatal(err)
		}
		if st, ok := ids[r.RequestID]; ok {
			seen++
			if r.Status != st || (st != 401 && r.Key != "he1") {
				t.Errorf("record %+v for a %d", r, st)
			}
		}
	}
	if seen != len(ids) {
		t.Fatalf("%d records for %d requests", seen, len(ids))
	}
}
