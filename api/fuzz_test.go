package api

import (
	"bytes"
	"encoding/json"
	"net/http/httptest"
	"testing"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/kms"
)

// FuzzDecode: no body makes the strict decoder panic, and every body it
// accepts has no duplicate or mis-cased keys and decodes with encoding/json.
func FuzzDecode(f *testing.F) {
	for _, s := range []string{
		`{"name":"k","kind":"ml-dsa-65"}`,
		`{"name":"k","kind":"ml-dsa-65","policy":{"destroy_wait_days":3,"allowed_operations":["sign"]}}`,
		`{"name":"k","name":"k"}`, `{"Name":"k"}`, `{"a":[{"b":1},{"b":2}]}`, `[]`, `{} {}`, `{"policy":{"x":{}}}`,
		`{"message":"aGk=","context":"aGk="}`, "", " ", `{"name":"\u006e"}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		r := httptest.NewRequest("POST", "/v1/keys", bytes.NewReader(body))
		r.Header.Set("Content-Type", "application/json")
		var req client.CreateKeyRequest
		if err := decode(r, &req, false); err != nil {
			return
		}
		if err := checkKeys(body); err != nil {
			t.Fatalf("decode accepted a body checkKeys refuses: %v", err)
		}
		var again client.CreateKeyRequest
		if err := json.Unmarshal(body, &again); err != nil {
			t.Fatalf("decode accepted a body encoding/json refuses: %v", err)
		}
		if again.Name != req.Name || again.Kind != req.Kind {
			t.Fatal("decoders disagree")
		}
	})
}

// FuzzCheckKeys: duplicate detection agrees with a simple model on flat
// objects built from fuzzed keys: distinct keys of a-z, 0-9 and _ only.
func FuzzCheckKeys(f *testing.F) {
	f.Add("a", "b")
	f.Add("a", "a")
	f.Add("x", "X")
	f.Add("s", "\u017f")
	f.Fuzz(func(t *testing.T, k1, k2 string) {
		b1, _ := json.Marshal(k1)
		b2, _ := json.Marshal(k2)
		// The keys as JSON carries them (invalid UTF-8 becomes U+FFFD).
		json.Unmarshal(b1, &k1)
		json.Unmarshal(b2, &k2)
		body := []byte(`{` + string(b1) + `:1,` + string(b2) + `:{"n":[1,{"m":2}]}}`)
		err := checkKeys(body)
		want := k1 != k2 && kms.PlainKey(k1) && kms.PlainKey(k2)
		if (err == nil) != want {
			t.Fatalf("checkKeys(%s) = %v, want ok=%v", body, err, want)
		}
	})
}
