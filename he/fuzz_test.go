package he

import (
	"encoding/json"
	"testing"

	"github.com/tuneinsight/lattigo/v6/core/rlwe"
	"github.com/tuneinsight/lattigo/v6/schemes/ckks"

	"github.com/kmsd-project/kmsd/kms"
)

// FuzzParseCiphertext: no request body crashes the decryption path (Lattigo
// panics or recurses forever on some malformed input).
func FuzzParseCiphertext(f *testing.F) {
	p, err := Resolve(CKKS, json.RawMessage(`"ckks-logn13"`))
	if err != nil {
		f.Fatal(err)
	}
	man, _ := json.Marshal(kms.Manifest{Kind: "ckks", ParamsID: p.ID, Params: p.JSON})
	sk, _ := SecretKey(p.RLWE(), make([]byte, SeedSize))
	pt := ckks.NewPlaintext(p.CKKS, 0)
	ckks.NewEncoder(p.CKKS).Encode([]float64{1}, pt)
	ct, _ := rlwe.NewEncryptor(p.CKKS, sk).EncryptNew(pt)
	good, _ := ct.MarshalBinary()
	f.Add(good)
	f.Add(good[:len(good)-1])
	f.Add([]byte{})
	k := &Kind{scheme: CKKS}
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := k.ParseCiphertext(man, b)
		if err == nil && c == nil {
			t.Fatal("no error and no ciphertext")
		}
		if err != nil && kms.KindOf(err) != kms.KindInvalid {
			t.Fatalf("error of kind %v: %v", kms.KindOf(err), err)
		}
	})
}
