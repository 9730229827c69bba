package main

import (
	"crypto/ed25519"
	"crypto/rand"
)

func newKey() ed25519.PrivateKey {
	_, k, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		panic(err)
	}
	return k
}
