package hsm

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"

	"github.com/miekg/pkcs11"

	"github.com/kmsd-project/kmsd/kms"
)

// Known answer for the wrap path: AES-256-GCM with this key, IV and AAD turns
// kat DEK into katWrapped. The constants were computed with Go's crypto/aes
// and crypto/cipher; TestSelfTestVectorMatchesSoftware recomputes them.
var (
	katKEK, _     = hex.DecodeString("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
	katIV, _      = hex.DecodeString("cafebabefacedbaddecaf888")
	katAAD        = []byte("kmsd hsm self-test")
	katDEK, _     = hex.DecodeString("d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72")
	katWrapped, _ = hex.DecodeString("5392920352fe49fee3525418d4e8afa58b876902ca2d9dae6093344c34b8ef8db65171f9960b5a001bc21a38f6b732ee")
)

// katCBCIV is the known IV of the cbc-hmac known answer.
var katCBCIV, _ = hex.DecodeString("000102030405060708090a0b0c0d0e0f")

// knownKey makes a session key of the given type holding a known value,
// for a known-answer test.
func (s *Sealer) knownKey(sh pkcs11.SessionHandle, keyType uint, value []byte, attrs ...*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	t := append([]*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, keyType),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE, value),
	}, attrs...)
	k, err := s.mod.CreateObject(sh, t)
	if err != nil {
		return 0, fmt.Errorf("create the known-answer key: %w", err)
	}
	return k, nil
}

// knownAnswer checks the token's primitives of profile p against known
// answers: AES-GCM (gcm: encryption and decryption; gcm-hsm-iv:
// decryption, since the token draws the IV of an encryption), or AES-CBC
// with padding and HMAC-SHA-256 (cbc-hmac), against Go's implementations.
func (s *Sealer) knownAnswer(sh pkcs11.SessionHandle, have map[uint]bool, p Profile) error {
	if p == ProfileKWP {
		return s.knownAnswerKWP(sh, kwpMechanism(have))
	}
	aesKey, err := s.knownKey(sh, pkcs11.CKK_AES, katKEK, pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true), pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true))
	if err != nil {
		return err
	}
	defer s.mod.DestroyObject(sh, aesKey)
	switch p {
	case ProfileGCM:
		ct, _, err := gcmEncrypt(s.mod, sh, aesKey, katIV, katAAD, katDEK)
		if err != nil {
			return err
		}
		if !bytes.Equal(ct, katWrapped) {
			return fmt.Errorf("AES-GCM encryption gave a wrong answer")
		}
		fallthrough
	case ProfileGCMHSMIV:
		pt, err := gcmDecrypt(s.mod, sh, aesKey, katIV, katAAD, katWrapped)
		if err != nil {
			return err
		}
		if !bytes.Equal(pt, katDEK) {
			return fmt.Errorf("AES-GCM decryption gave a wrong answer")
		}
		// And it checks the tag: a wrapped key changed in one bit is
		// refused.
		bad := bytes.Clone(katWrapped)
		bad[len(bad)-1] ^= 1
		if _, err := gcmDecrypt(s.mod, sh, aesKey, katIV, katAAD, bad); err == nil {
			return fmt.Errorf("AES-GCM decryption accepted a wrong tag")
		}
	case ProfileCBCHMAC:
		want := softCBCPad(katKEK, katCBCIV, katDEK)
		ct, err := cbcEncrypt(s.mod, sh, aesKey, katCBCIV, katDEK)
		if err != nil {
			return err
		}
		if !bytes.Equal(ct, want) {
			return fmt.Errorf("AES-CBC-PAD encryption gave a wrong answer")
		}
		if pt, err := cbcDecrypt(s.mod, sh, aesKey, katCBCIV, ct); err != nil || !bytes.Equal(pt, katDEK) {
			return fmt.Errorf("AES-CBC-PAD decryption gave a wrong answer (%v)", err)
		}
		macKey, err := s.knownKey(sh, pkcs11.CKK_GENERIC_SECRET, katKEK, pkcs11.NewAttribute(pkcs11.CKA_SIGN, true))
		if err != nil {
			return err
		}
		defer s.mod.DestroyObject(sh, macKey)
		msg := macInput(katAAD, katCBCIV, want)
		mac, err := hmacSign(s.mod, sh, macKey, msg)
		if err != nil {
			return err
		}
		h := hmac.New(sha256.New, katKEK)
		h.Write(msg)
		if !bytes.Equal(mac, h.Sum(nil)) {
			return fmt.Errorf("HMAC-SHA-256 gave a wrong answer")
		}
	}
	return nil
}

// knownAnswerKWP checks the token's key wrap (the mechanism kwp uses there)
// against RFC 5649 in Go: a known value wraps to the known answer, the
// answer unwraps to the value, and a changed wrap is refused.
func (s *Sealer) knownAnswerKWP(sh pkcs11.SessionHandle, mech uint) error {
	if mech == 0 {
		return fmt.Errorf("the token lists no AES key wrap with padding")
	}
	wrapKey, err := s.knownKey(sh, pkcs11.CKK_AES, katKEK, pkcs11.NewAttribute(pkcs11.CKA_WRAP, true), pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, true))
	if err != nil {
		return err
	}
	defer s.mod.DestroyObject(sh, wrapKey)
	value := kwpValue(katDEK, katAAD)
	want := softKWP(katKEK, value)
	got, err := kwpWrap(s.mod, sh, wrapKey, mech, value)
	if err != nil {
		return err
	}
	if !bytes.Equal(got, want) {
		return fmt.Errorf("%s gave another answer than RFC 5649's (%d bytes for %d)", mechName(mech), len(got), len(value))
	}
	back, err := kwpUnwrap(s.mod, sh, wrapKey, mech, want)
	if err != nil {
		return err
	}
	if !bytes.Equal(back, value) {
		return fmt.Errorf("%s unwrapped a known answer to other bytes", mechName(mech))
	}
	bad := bytes.Clone(want)
	bad[len(bad)-1] ^= 1
	if _, err := kwpUnwrap(s.mod, sh, wrapKey, mech, bad); err == nil {
		return fmt.Errorf("%s unwrapped a changed wrap", mechName(mech))
	}
	return nil
}

func mechName(m uint) string {
	if m == ckmAESKeyWrapKWP {
		return "CKM_AES_KEY_WRAP_KWP"
	}
	return "CKM_AES_KEY_WRAP_PAD"
}

// softKWP is AES key wrap with padding (RFC 5649) in software: the
// reference the token's answer is checked against.
func softKWP(kek, pt []byte) []byte {
	b, err := aes.NewCipher(kek)
	if err != nil {
		panic(err)
	}
	// The alternative initial value: 0xA65959A6, then the length.
	var a [8]byte
	copy(a[:], []byte{0xa6, 0x59, 0x59, 0xa6})
	binary.BigEndian.PutUint32(a[4:], uint32(len(pt)))
	padded := append(bytes.Clone(pt), make([]byte, (8-len(pt)%8)%8)...)
	n := len(padded) / 8
	if n == 1 {
		out := make([]byte, 16)
		b.Encrypt(out, append(a[:], padded...))
		return out
	}
	// RFC 3394's wrapping process with that initial value.
	var blk [16]byte
	for j := 0; j < 6; j++ {
		for i := 0; i < n; i++ {
			copy(blk[:8], a[:])
			copy(blk[8:], padded[8*i:8*i+8])
			b.Encrypt(blk[:], blk[:])
			t := uint64(n*j + i + 1)
			binary.BigEndian.PutUint64(a[:], binary.BigEndian.Uint64(blk[:8])^t)
			copy(padded[8*i:], blk[8:])
		}
	}
	return append(a[:], padded...)
}

// softCBCPad is AES-CBC with PKCS#7 padding in software: the reference
// the token's answer is checked against.
func softCBCPad(key, iv, pt []byte) []byte {
	b, _ := aes.NewCipher(key)
	n := aes.BlockSize - len(pt)%aes.BlockSize
	padded := append(bytes.Clone(pt), bytes.Repeat([]byte{byte(n)}, n)...)
	out := make([]byte, len(padded))
	cipher.NewCBCEncrypter(b, iv).CryptBlocks(out, padded)
	return out
}

// selfTest checks the wrap path two ways before the sealer is used:
//  1. known answer: the token's primitives of the profile in use, keyed
//     with known session keys, give the known answers;
//  2. round trip: a blob sealed under the real KEK opens, and fails to open
//     under another context.
func (s *Sealer) selfTest() error {
	ctx := context.Background()
	err := s.run(ctx, func(sh pkcs11.SessionHandle, k keys) error { return s.knownAnswer(sh, k.have, s.profile) })
	if err != nil {
		return fmt.Errorf("%w: profile %s: %v", ErrSelfTest, s.profile, err)
	}
	sc := kms.SealContext{Key: "self-test", Version: 1, Kind: "self-test"}
	want := []byte("kmsd self-test material")
	b, err := s.Seal(ctx, sc, kms.NewSecret(bytes.Clone(want)))
	if err != nil {
		return fmt.Errorf("%w: seal: %v", ErrSelfTest, err)
	}
	got, err := s.Unseal(ctx, sc, b)
	if err != nil || !bytes.Equal(got.Reveal(), want) {
		return fmt.Errorf("%w: a sealed blob did not open: %v", ErrSelfTest, err)
	}
	sc.Version = 2
	if _, err := s.Unseal(ctx, sc, b); err == nil {
		return fmt.Errorf("%w: a blob opened under the wrong context", ErrSelfTest)
	}
	return nil
}
