package he

import (
	"encoding/json"
	"testing"

	"github.com/tuneinsight/lattigo/v6/core/rlwe"
	"github.com/tuneinsight/lattigo/v6/schemes/ckks"

	"github.com/kmsd-project/kmsd/kms"
)

// FuzzOpenEnvelope: no envelope crashes the decryption path (Lattigo
// panics or recurses forever on some malformed input): every input is
// either refused as invalid or yields a ciphertext the envelope describes.
func FuzzOpenEnvelope(f *testing.F) {
	p, err := Resolve(CKKS, json.RawMessage(`"ckks-logn13"`))
	if err != nil {
		f.Fatal(err)
	}
	sk, _ := SecretKey(p.RLWE(), make([]byte, SeedSize))
	pt := ckks.NewPlaintext(p.CKKS, 0)
	ckks.NewEncoder(p.CKKS).Encode([]float64{1}, pt)
	ct, _ := rlwe.NewEncryptor(p.CKKS, sk).EncryptNew(pt)
	good, _ := ct.MarshalBinary()
	scale, _ := ct.Scale.Value.Float64()
	env := func(b []byte) []byte {
		out, _ := json.Marshal(kms.Envelope{Key: "k", Version: 1, ParamsID: p.ID, Level: 0, Scale: scale, Slots: 1, Ciphertext: b})
		return out
	}
	f.Add(env(good))
	f.Add(env(good[:len(good)-1]))
	f.Add(env([]byte{}))
	f.Add([]byte(`{"key":"k","version":1}`))
	f.Add([]byte(`{}`))
	max := rlwe.NewCiphertext(p.RLWE(), 1, p.RLWE().MaxLevel()).BinarySize()
	f.Fuzz(func(t *testing.T, b []byte) {
		e, err := kms.ParseEnvelope(b, max)
		if err != nil {
			if kms.KindOf(err) != kms.KindInvalid {
				t.Fatalf("error of kind %v: %v", kms.KindOf(err), err)
			}
			return
		}
		c, err := OpenEnvelope(p.RLWE(), e)
		if err != nil {
			if kms.KindOf(err) != kms.KindInvalid {
				t.Fatalf("error of kind %v: %v", kms.KindOf(err), err)
			}
			return
		}
		if c == nil || c.Level() != e.Level || e.Slots > c.Slots() {
			t.Fatalf("an envelope that does not describe its ciphertext was accepted: %v", e)
		}
	})
}
