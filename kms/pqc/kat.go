package pqc

import (
	"bytes"
	"crypto/sha256"
	_ "embed"
	"encoding/hex"
	"encoding/json"
	"fmt"

	"github.com/cloudflare/circl/kem"

	"github.com/kmsd-project/kmsd/kms"
)

// kat.json holds, for each parameter set, the first keyGen vector and (for
// ML-KEM) the first encapsulation vector of the NIST ACVP files that circl
// ships in its testdata. Public keys and ciphertexts are kept as SHA-256
// digests to keep the binary small. TestKATFromACVP regenerates the file from
// circl's copy and fails if they differ.
//
//go:embed kat.json
var katJSON []byte

type katFile struct {
	Source string      `json:"source"`
	KeyGen []katKeyGen `json:"key_gen"`
	Encap  []katEncap  `json:"encap"`
}

type katKeyGen struct {
	ParameterSet string `json:"parameter_set"`
	TcID         int    `json:"tc_id"`
	Seed         string `json:"seed"`          // ML-KEM: d||z; ML-DSA: xi
	PublicSHA256 string `json:"public_sha256"` // of the expected ek / pk
}

type katEncap struct {
	ParameterSet string `json:"parameter_set"`
	TcID         int    `json:"tc_id"`
	EK           string `json:"ek"`
	M            string `json:"m"`
	CSHA256      string `json:"c_sha256"`
	K            string `json:"k"`
}

// SelfTest runs the known-answer tests for every parameter set. kmsd calls it
// at start and refuses to serve if it fails.
func SelfTest() error {
	var f katFile
	if err := json.Unmarshal(katJSON, &f); err != nil {
		return fmt.Errorf("pqc self-test: decode vectors: %w", err)
	}
	seen := map[string]bool{}
	for _, v := range f.KeyGen {
		if err := v.check(); err != nil {
			return fmt.Errorf("pqc self-test: %s keyGen tcId %d: %w", v.ParameterSet, v.TcID, err)
		}
		seen[v.ParameterSet] = true
	}
	for _, v := range f.Encap {
		if err := v.check(); err != nil {
			return fmt.Errorf("pqc self-test: %s encapsulation tcId %d: %w", v.ParameterSet, v.TcID, err)
		}
	}
	for _, k := range Kinds() {
		if !seen[acvpName(k.Name())] {
			return fmt.Errorf("pqc self-test: no known-answer vector for %s", k.Name())
		}
	}
	return nil
}

// byACVPName finds the kind of an ACVP parameter set name, or nil.
func byACVPName(ps string) kms.KeyKind {
	for _, k := range Kinds() {
		if acvpName(k.Name()) == ps {
			return k
		}
	}
	return nil
}

// acvpName maps "ml-kem-768" to "ML-KEM-768".
func acvpName(kind string) string { return string(bytes.ToUpper([]byte(kind))) }

func (v katKeyGen) check() error {
	seed, err := hex.DecodeString(v.Seed)
	if err != nil {
		return err
	}
	var pub []byte
	kind := byACVPName(v.ParameterSet)
	if k, ok := kind.(*kemKind); ok {
		ks := k.scheme
		if len(seed) != ks.SeedSize() {
			return fmt.Errorf("seed is %d bytes", len(seed))
		}
		pk, _ := ks.DeriveKeyPair(seed)
		pub, err = pk.MarshalBinary()
	} else if d, ok := kind.(*dsaKind); ok {
		ss := d.scheme
		if len(seed) != ss.SeedSize() {
			return fmt.Errorf("seed is %d bytes", len(seed))
		}
		pk, _ := ss.DeriveKey(seed)
		pub, err = pk.MarshalBinary()
	} else {
		return fmt.Errorf("unknown parameter set")
	}
	if err != nil {
		return err
	}
	if got := sha256.Sum256(pub); hex.EncodeToString(got[:]) != v.PublicSHA256 {
		return fmt.Errorf("public key does not match the known answer")
	}
	return nil
}

func (v katEncap) check() error {
	k, ok := byACVPName(v.ParameterSet).(*kemKind)
	if !ok {
		return fmt.Errorf("unknown parameter set")
	}
	s := k.scheme
	ekb, err1 := hex.DecodeString(v.EK)
	m, err2 := hex.DecodeString(v.M)
	wantK, err3 := hex.DecodeString(v.K)
	if err1 != nil || err2 != nil || err3 != nil || len(m) != s.EncapsulationSeedSize() {
		return fmt.Errorf("malformed vector")
	}
	var ek kem.PublicKey
	if ek, err1 = s.UnmarshalBinaryPublicKey(ekb); err1 != nil {
		return err1
	}
	ct, ss, err := s.EncapsulateDeterministically(ek, m)
	if err != nil {
		return err
	}
	if got := sha256.Sum256(ct); hex.EncodeToString(got[:]) != v.CSHA256 || !bytes.Equal(ss, wantK) {
		return fmt.Errorf("ciphertext or shared secret does not match the known answer")
	}
	return nil
}
