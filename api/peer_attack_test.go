package api_test

import (
	"crypto/rand"
	"encoding/base64"
	"errors"
	"net/http"
	"net/http/httptest"
	"strconv"
	"testing"
	"time"

	"github.com/cloudflare/circl/sign/mldsa/mldsa65"

	"github.com/kmsd-project/kmsd/api"
	"github.com/kmsd-project/kmsd/internal/testutil"
)

// zeros is an endless request body that counts what the server reads (and
// gives up at 64 MiB, so that the test does not eat the machine).
type zeros struct{ n int64 }

func (z *zeros) Read(p []byte) (int, error) {
	if z.n >= 64<<20 {
		return 0, errors.New("the server read 64 MiB")
	}
	clear(p)
	z.n += int64(len(p))
	return len(p), nil
}

// TestPeerBodyNotReadBeforeAuthentication: POST /v1/peer/{op} takes no
// bearer token; a request that is not signed by a configured peer (an
// unknown name, or a known one with a forged signature) is refused
// before its body is read. Before: the server buffered up to 5 GiB of
// anyone's body (io.ReadAll, doubling) and only then looked at who sent
// it: a few concurrent anonymous requests exhaust its memory.
func TestPeerBodyNotReadBeforeAuthentication(t *testing.T) {
	pub, _, err := mldsa65.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := pub.MarshalBinary()
	_, caFile := testutil.TLSServer(t, http.NotFoundHandler())
	peers, err := api.NewPeers(&api.PeerConfig{Self: "node-a", Peers: []api.PeerInfo{{Name: "node-b", URL: "https://127.0.0.1:1", Identity: base64.StdEncoding.EncodeToString(raw), CACert: caFile}}})
	if err != nil {
		t.Fatal(err)
	}
	testOptions = func(o *api.Options) { o.Peers = peers }
	defer func() { testOptions = nil }()
	e := newEnv(t)
	forged := base64.StdEncoding.EncodeToString(make([]byte, mldsa65.SignatureSize))
	for _, from := range []string{"mallory", "node-b"} {
		body := &zeros{}
		req := httptest.NewRequest(http.MethodPost, "/v1/peer/setup-shamir", body)
		req.Header.Set("Kmsd-Peer", from)
		req.Header.Set("Kmsd-Peer-Time", strconv.FormatInt(time.Now().Unix(), 10))
		req.Header.Set("Kmsd-Peer-Signature", forged)
		rec := httptest.NewRecorder()
		e.api.Handler().ServeHTTP(rec, req)
		if rec.Code != http.StatusUnauthorized || body.n > 64<<10 {
			t.Errorf("from %s, forged: %d after reading %d bytes of the body", from, rec.Code, body.n)
		}
	}
}
